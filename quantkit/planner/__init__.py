"""Memory planner: will this model, in this precision, serve on these GPUs with vLLM?

Everything here is arithmetic on config.json; no weight is read. One module per job:

- ``shape``: the config.json fields the planner needs, per-rank Linear shapes, parameters;
- ``precision``: how each precision stores a Linear, and a model's weight bytes in it;
- ``budget``: vLLM's memory accounting per GPU and the longest context that fits;
- ``recommend``: which precision to serve, and the notes that explain it;
- ``serve``: the ``vllm serve`` command line;
- ``config``: config.json from a folder, a built-in model or a hub id;
- ``quantize``: the device memory quantizing the largest layer takes (MoE layers included),
  for a recipe's quantizer (``Calibrating``) or the shipped 4-bit recipes';
- ``result``: the typed ``PlanResult`` and the table it prints as;
- ``plan``: ``plan_model`` / ``plan_config``, which put the others together.
"""

from ..errors import PlanError
from .budget import (
    BLOCK_SIZE,
    EngineDefaults,
    KVCacheDtype,
    SchemePlan,
    activation_bytes,
    engine_defaults,
    headroom_needed,
    kv_bytes_per_token,
    max_model_len,
    plan_scheme,
)
from .config import load_config
from .plan import plan_config, plan_model
from .precision import SCHEMES, PrecisionScheme, WeightBytes, get_scheme, weight_bytes
from .quantize import Calibrating, QuantizeMemory, quantize_memory
from .recommend import PREFERENCE, recommend
from .result import PlanResult, format_plan_table
from .serve import quantized_output_name, serve_command
from .shape import LinearShape, ModelShape, check_tensor_parallel, count_parameters, linear_shapes

__all__ = [
    "BLOCK_SIZE", "KVCacheDtype", "EngineDefaults", "SchemePlan", "activation_bytes", "engine_defaults",
    "headroom_needed", "kv_bytes_per_token", "max_model_len", "plan_scheme", "load_config", "plan_config",
    "plan_model", "SCHEMES", "PrecisionScheme", "WeightBytes", "get_scheme", "weight_bytes", "PREFERENCE",
    "recommend", "PlanResult", "format_plan_table", "quantized_output_name", "serve_command", "LinearShape",
    "ModelShape", "check_tensor_parallel", "count_parameters", "linear_shapes", "PlanError", "Calibrating",
    "QuantizeMemory", "quantize_memory",
]
