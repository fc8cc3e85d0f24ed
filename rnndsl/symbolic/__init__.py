"""The step IR and its derivative: lowering the checked AST, the operators, reverse mode."""
