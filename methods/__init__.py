"""Built-in method plugins (registered through the "bench" entry-point group like any outside plugin)."""
