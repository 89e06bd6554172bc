"""Any Flax network: a traced program of primitives, channel coupling found from it, masked apply and materialization driven by the trace."""
