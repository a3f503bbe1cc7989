"""Names shared by all nodes: categories and the node-id prefix."""

CATEGORY_ROOT = "FlowDPS"
CATEGORY_OPERATORS = "FlowDPS/operators"
CATEGORY_MEASUREMENT = "FlowDPS/measurement"
CATEGORY_SAMPLERS = "sampling/custom_sampling/samplers"
NODE_ID_PREFIXES = ("FlowDPS", "FlowChef", "AFDPS")

# The custom socket type that carries a degradation operator (operators.LinearOperator) between nodes.
OPERATOR_TYPE = "FLOWDPS_OPERATOR"
