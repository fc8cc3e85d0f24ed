"""The language front end: a spec file becomes a checked AST (spec, parse, check), with one error type."""
