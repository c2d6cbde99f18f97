"""splitserve: a compact LLM inference engine that splits work where it pays."""

from splitserve.llm import LLM
from splitserve.outputs import CompletionOutput, RequestOutput
from splitserve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
