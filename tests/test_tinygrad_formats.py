"""device="tinygrad" on the GGUF formats its graph does not unpack (Q5_0, Q5_1 here; K-quants and IQ4_NL
take the same path): they are dequantized once at load by the gguf package. Greedy tokens of a tiny
llama must be the float64 reference's, as on the native path."""
import pytest

import tiny_arch_models as ta
from reference_forward import ReferenceModel
from test_generate import teacher_forced_check
from test_tinygrad import needs_tinygrad
from tinyvllm import LLM, SamplingParams


@needs_tinygrad
@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_tinygrad_runs_formats_it_dequantizes_at_load(tmp_path, qtype):
    path = ta.write_gguf(tmp_path / f"llama-{qtype}.gguf", "llama", qtype)
    ref = ReferenceModel.from_gguf(path)
    prompts = [[5, 17, 33, 2 + i, 40, 41, 9] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for device in ("tinygrad", "cpu"):
        llm = LLM(path, device=device, threads=2)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        ties = []
        for p, o in zip(prompts, outs):
            ties += teacher_forced_check(ref, p, o.outputs[0].token_ids, f"{device} {qtype}")
        assert len(ties) <= 1, ties
