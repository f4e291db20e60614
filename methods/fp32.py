"""The full-precision reference: the (fine-tuned) FP model, unchanged. Every run includes it."""

from bench import hookimpl
from bench.api import Method


class FP32(Method):
    description = "full-precision reference (no quantization)"
    data_used = "none"
    role = "reference"
    changes_model = False

    def quantize(self, model, spec, context):
        return model


@hookimpl
def register_methods(register):
    register("fp32", FP32, aliases=("fp",))
