"""What a request gives when it runs on an engine by itself: the baseline that batched, served and
async runs are compared against."""


def offline(engine, prompt, params):
    """One request on the engine alone, stepped to the end on this thread; its final RequestOutput."""
    rid = engine.add_request(None, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out
