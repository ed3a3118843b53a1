"""supportsim: synthetic customer-support conversations between LLM bots over Kafka."""

import warnings

# quixstreams imports authlib's httpx client, which warns on every start; it is not ours to fix
warnings.filterwarnings("ignore", message="The httpx module is deprecated")

__version__ = "0.1.0"
