"""The command-line jobs: `fishkern demo` (offline MiniLM/VADER) and `fishkern glue` (the paper's recipe)."""
