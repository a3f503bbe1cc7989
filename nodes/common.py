"""Names shared by all nodes: categories, the node-id prefixes and the operator socket type."""

from comfy_api.latest import io

CATEGORY_ROOT = "FlowDPS"
CATEGORY_OPERATORS = "FlowDPS/operators"
CATEGORY_MEASUREMENT = "FlowDPS/measurement"
CATEGORY_SAMPLERS = "sampling/custom_sampling/samplers"
NODE_ID_PREFIXES = ("FlowDPS", "FlowChef", "AFDPS")

OPERATOR_TYPE = "FLOWDPS_OPERATOR"
"""The custom socket type that carries a degradation operator (operators.LinearOperator) between nodes."""

Operator = io.Custom(OPERATOR_TYPE)
"""The socket class of :data:`OPERATOR_TYPE` (``Operator.Input(...)`` / ``Operator.Output(...)``)."""
