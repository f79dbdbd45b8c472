"""Built-in backends. Each maps a MaskProblem to a Solution and never touches a model."""
