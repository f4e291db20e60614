"""Built-in task plugins (registered through the "bench" entry-point group like any outside plugin)."""
