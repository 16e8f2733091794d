def step_cache_support(pipe_or_transformer, kind):
    return "not yet"
