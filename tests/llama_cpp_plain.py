"""llama.cpp (llama-cpp-python) as the tests run it: on its plain CPU path.

ggml's AMX matmul (an "extra buffer type", chosen when a wheel built with GGML_NATIVE runs on a Xeon
with AMX) segfaults inside llama_decode here (llama-cpp-python 0.3.36, Sapphire-Rapids-class VM,
any model and format). Turning extra buffer types off also skips ggml's weight repacking, which
changes only its memory layout; the tests compare numbers, not speed."""
import contextlib

import llama_cpp
import llama_cpp.llama_cpp as _api


@contextlib.contextmanager
def _without_extra_buffer_types():
    default = _api.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    _api.llama_model_default_params = params
    try:
        yield
    finally:
        _api.llama_model_default_params = default


def Llama(model_path: str, **kwargs) -> llama_cpp.Llama:
    with _without_extra_buffer_types():
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
