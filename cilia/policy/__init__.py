"""The policy model (NetworkPolicy, parsed and validated) and its compiler to BPF entries."""


class PolicyError(ValueError):
    """A policy the API may accept but cilia cannot enforce; names the field."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field = field
        self.msg = msg
