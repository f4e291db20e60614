"""RTN: round every weight to the nearest point of a uniform grid. The PTQ floor every method must beat.

The grid's range is a setting: ``minmax`` (no clipping), ``percentile`` (99.99th percentile) or ``mse``
(GPTQ's shrink search minimizing the rounding error): ``--set rtn.clip=mse``.
"""

from dataclasses import dataclass
from functools import partial
from typing import Literal

from bench import hookimpl
from bench.api import Method
from bench.quant import WeightQuantizer, freeze, quantize_model


@dataclass(frozen=True)
class RTNConfig:
    clip: Literal["minmax", "percentile", "mse"] = "minmax"


class RTN(Method):
    description = "round-to-nearest (post-training, data-free); clip: minmax | percentile | mse"
    data_used = "none"
    role = "baseline"  # with default settings, added beside every quantized cell at the same grid
    Config = RTNConfig

    def quantize(self, model, spec, context):
        model = quantize_model(
            model, spec, keep_fp=context.keep_fp, weight_quantizer=partial(WeightQuantizer, clip=self.config.clip)
        )
        return freeze(model)


@hookimpl
def register_methods(register):
    register("rtn", RTN)
