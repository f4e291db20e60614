"""RTN: round every weight to the nearest point of a min-max uniform grid. The PTQ floor every method must beat."""

from bench import hookimpl
from bench.api import Method
from bench.quant import quantize_model


class RTN(Method):
    description = "round-to-nearest, min-max range (post-training, data-free)"
    data_used = "none"

    def quantize(self, model, spec, context):
        return quantize_model(model, spec, keep_fp=context.keep_fp)


@hookimpl
def register_methods(register):
    register("rtn", RTN)
