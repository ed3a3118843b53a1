"""dataset_sink: appends every finished conversation from `chat-scored` to DATASET_DIR."""

from supportsim.sinks.dataset_files import run_dataset_sink

if __name__ == "__main__":
    run_dataset_sink()
