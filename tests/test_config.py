import dataclasses
import textwrap

import pytest

from sdft.config import (BenchmarkConfig, Config, LossConfig, apply_overrides,
                         config_to_dict, dump_config, load_config, validate_config)

DATA = ["data.path=train.jsonl"]


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def test_defaults_follow_the_official_code():
    config = load_config(None, DATA)
    assert config.seed == 0 and config.algorithm == "sdft" and config.run_name == "sdft"
    assert config.teacher.mode == "ema" and config.teacher.ema_alpha == 0.01
    assert config.loss.targets == "full" and config.loss.kind == "forward" and config.loss.is_clip == 2.0
    assert config.loss.skip_first_n_tokens == 3 and config.loss.reduction == "seq_mean"
    assert config.optim.lr == 2e-5 and config.optim.schedule == "cosine" and config.optim.warmup_ratio == 0.1
    assert config.optim.batch_size == 32 and config.optim.max_grad_norm == 1.0
    assert config.data.max_prompt_tokens == 1024 and config.generation.max_new_tokens == 1024
    assert config.student.lora_target_modules[0] == "q_proj" and len(config.student.lora_target_modules) == 7
    assert config.eval.benchmarks == [] and config.checkpoint.keep_last == 2
    assert Config().student.lora_target_modules is not Config().student.lora_target_modules


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, """
        seed: 7
        run_name: tool
        teacher:
          mode: static
        loss:
          kind: jsd
          beta: 0.25
        optim:
          lr: 5e-5          # YAML 1.1 reads this as a string; the float field parses it
          max_steps: 10
        data:
          path: data/train.jsonl
          system_prompt: null
        eval:
          benchmarks:
            - name: capitals
              kind: tasks
              path: bench/capitals
              run_every: 5
    """)
    config = load_config(path, ["loss.kind=reverse", "teacher.mode=ema", "optim.max_steps=null",
                                "eval.benchmarks[0].max_items=4", "student.lora_target_modules=[q_proj, v_proj]",
                                "loss.kind=forward"])
    assert config.seed == 7 and config.run_name == "tool"
    assert config.loss.kind == "forward" and config.loss.beta == 0.25
    assert config.teacher.mode == "ema"
    assert config.optim.lr == 5e-5 and isinstance(config.optim.lr, float) and config.optim.max_steps is None
    assert config.student.lora_target_modules == ["q_proj", "v_proj"]
    bench = config.eval.benchmarks[0]
    assert isinstance(bench, BenchmarkConfig)
    assert (bench.name, bench.kind, bench.path, bench.run_every, bench.max_items) == (
        "capitals", "tasks", "bench/capitals", 5, 4)
    assert bench.split == "val" and bench.max_new_tokens == 256 and bench.tooluse_mode == "strict"


def test_override_values_are_yaml_and_strings_stay_strings():
    config = load_config(None, DATA + [
        "run_name=2024", "model.name=my-org/model-1.5B", "optim.micro_batch_size=4", "optim.lr=1e-3",
        "model.gradient_checkpointing=true", "model.cache_dir=/tmp/cache",
        "eval.benchmarks=[{name: held, kind: heldout}]", "data.split=random",
        "loss.is_clip=null", "data.system_prompt=You are: helpful"])
    assert config.run_name == "2024"
    assert config.model.name == "my-org/model-1.5B" and config.model.gradient_checkpointing is True
    assert config.optim.micro_batch_size == 4 and config.optim.lr == 1e-3
    assert config.eval.benchmarks[0].kind == "heldout" and config.eval.benchmarks[0].path is None
    assert config.loss.is_clip is None
    assert config.data.system_prompt == "You are: helpful"


def test_empty_yaml_and_empty_sections_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "\n"), DATA) == load_config(None, DATA)
    assert load_config(write(tmp_path, "loss:\nteacher:\n", "b.yaml"), DATA).loss == LossConfig()


def test_unknown_key_in_yaml_names_key_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, """
        seed: 1
        loss:
          kind: reverse
          tempreature: 2.0
    """)
    with pytest.raises(ValueError) as error:
        load_config(path)
    message = str(error.value)
    assert "'loss.tempreature'" in message
    assert f"{path}:4" in message
    assert "did you mean 'loss.temperature'" in message
    assert "kind, beta, topk" in message


def test_unknown_top_level_key_and_section(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'optimizer'.*:2\).*did you mean 'optim'.*top level: seed"):
        load_config(write(tmp_path, "seed: 1\noptimizer:\n  lr: 1.0\n"))
    with pytest.raises(ValueError, match=r"unknown key 'loss.kindd' \(override 'loss.kindd=x'\)"):
        load_config(None, DATA + ["loss.kindd=x"])


def test_unknown_key_inside_a_benchmark_entry(tmp_path):
    path = write(tmp_path, """
        eval:
          benchmarks:
            - name: a
              kind: tasks
              path: p
            - name: b
              knd: tasks
    """)
    with pytest.raises(ValueError) as error:
        load_config(path, DATA)
    assert "'eval.benchmarks[1].knd'" in str(error.value) and f"{path}:7" in str(error.value)
    assert "did you mean 'eval.benchmarks[1].kind'" in str(error.value)


@pytest.mark.parametrize("override, expected", [
    ("seed=1.5", r"seed \(override 'seed=1.5'\): got 1.5; expected an int"),
    ("resume=yes please", r"resume .*got 'yes please'; expected a bool"),
    ("optim.batch_size=true", r"optim.batch_size .*got True; expected an int"),
    ("loss.beta=high", r"loss.beta .*got 'high'; expected a float"),
    ("student.lora_target_modules=q_proj", r"student.lora_target_modules .*expected a list of str"),
    ("loss=3", r"loss .*expected a mapping with keys targets, kind"),
    ("eval.benchmarks=[{name: x, kind: tasks, path: p, max_items: many}]",
     r"eval.benchmarks\[0\].max_items .*got 'many'; expected an int"),
    ("optim.lr=nan", r"optim.lr .*got nan"),
])
def test_wrong_types_name_key_value_and_expected_type(override, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, DATA + [override])


def test_wrong_type_in_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n  batch_size: many\n")
    with pytest.raises(ValueError) as error:
        load_config(path, DATA)
    assert str(error.value).startswith(f"optim.batch_size ({path}:3): got 'many'; expected an int")


@pytest.mark.parametrize("override, allowed", [
    ("loss.beta=1.5", "a value in [0, 1]"),
    ("teacher.ema_alpha=0", "a value in (0, 1]"),
    ("student.lora_dropout=1.0", "a value in [0, 1)"),
    ("student.lora_rank=0", "a value >= 1"),
    ("loss.temperature=-1", "a value > 0"),
    ("loss.skip_first_n_tokens=-1", "a value >= 0"),
    ("generation.top_p=1.01", "a value in (0, 1]"),
    ("optim.warmup_ratio=1", "a value in [0, 1)"),
    ("checkpoint.keep_last=0", "a value >= 1"),
    ("optim.max_grad_norm=0", "a value > 0"),
])
def test_out_of_range_values_name_key_value_and_range(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ValueError) as error:
        load_config(None, DATA + [override])
    message = str(error.value)
    assert message.startswith(f"{key} (override '{override}'): got ")
    assert f"allowed: {allowed}" in message


def test_unknown_choice_lists_allowed_values_with_suggestion(tmp_path):
    with pytest.raises(ValueError) as error:
        load_config(None, DATA + ["loss.kind=revers"])
    assert str(error.value) == ("loss.kind (override 'loss.kind=revers'): got 'revers'; allowed values: "
                                "'forward', 'reverse', 'jsd' (did you mean 'reverse'?)")
    path = write(tmp_path, "teacher:\n  mode: frozen\n")
    with pytest.raises(ValueError, match=rf"teacher.mode \({path}:2\): got 'frozen'; allowed values: "
                                         r"'static', 'ema', 'sync'"):
        load_config(path, DATA)


def test_teacher_template_names_and_custom_placeholders():
    assert load_config(None, DATA + ["teacher.template=cookbook"]).teacher.template == "cookbook"
    custom = "teacher.template=Q: $orig_content A: $output_text. Go."
    assert load_config(None, DATA + [custom]).teacher.template == "Q: $orig_content A: $output_text. Go."
    with pytest.raises(ValueError, match=r"teacher.template .*lacks the placeholder\(s\) \$output_text"):
        load_config(None, DATA + ["teacher.template=Question: $orig_content"])
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \$answer"):
        load_config(None, DATA + ["teacher.template=$orig_content $output_text $answer"])
    with pytest.raises(ValueError, match=r"not a valid string.Template"):
        load_config(None, DATA + ["teacher.template=$orig_content $output_text costs $5"])


@pytest.mark.parametrize("overrides, expected", [
    (["teacher.mode=sync"], r"teacher.mode=sync needs teacher.sync_every >= 1.*got teacher.sync_every=0"),
    (["optim.batch_size=32", "optim.micro_batch_size=5"],
     r"optim.micro_batch_size=5 must divide optim.batch_size=32"),
    (["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B", "loss.targets=topk"],
     r"EMA is impossible on Tinker: the teacher can only be the base model or a saved copy; use "
     r"teacher.mode=static or teacher.mode=sync"),
    (["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B", "teacher.mode=static"],
     r"full-vocabulary targets need teacher hidden states; Tinker exposes top-K log-probs only; use "
     r"loss.targets=topk or loss.targets=sampled"),
    (["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B", "teacher.mode=static",
      "loss.targets=topk", "student.mode=full"], r"student.mode=full.*use student.mode=lora"),
    (["backend.kind=tinker", "teacher.mode=static", "loss.targets=topk"], r"backend.tinker_base_model"),
    (["loss.targets=sampled"], r"loss.targets=sampled .*got loss.kind=forward, allowed: loss.kind=reverse"),
    (["eval.benchmarks=[{name: h, kind: heldout}]"], r"eval.benchmarks\[0\].kind=heldout .*data.split=none"),
    (["eval.benchmarks=[{name: t, kind: tooluse}]"], r"eval.benchmarks\[0\].path is required"),
    (["eval.benchmarks=[{name: t, kind: tasks, path: a}, {name: t, kind: tasks, path: b}]"],
     r"eval.benchmarks\[1\].name='t' is used by more than one"),
    (["eval.benchmarks=[{kind: tasks, path: a}]"], r"eval.benchmarks\[0\].name"),
])
def test_cross_field_rules(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, DATA + overrides)


def test_data_path_is_required():
    with pytest.raises(ValueError, match=r"data.path is required"):
        load_config(None)


def test_valid_tinker_and_sync_configs():
    tinker = load_config(None, DATA + ["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B",
                                       "teacher.mode=sync", "teacher.sync_every=10", "loss.targets=topk"])
    assert tinker.backend.kind == "tinker" and tinker.teacher.sync_every == 10
    sampled = load_config(None, DATA + ["loss.targets=sampled", "loss.kind=reverse"])
    assert sampled.loss.targets == "sampled"


def test_round_trip_through_dict_and_yaml(tmp_path):
    config = load_config(None, DATA + [
        "loss.kind=jsd", "teacher.template=Q $orig_content A $output_text", "optim.max_steps=3",
        "eval.benchmarks=[{name: a, kind: tasks, path: p, run_every: 2}, {name: b, kind: science, path: q}]"])
    as_dict = config_to_dict(config)
    assert as_dict["eval"]["benchmarks"][1] == dataclasses.asdict(config.eval.benchmarks[1])
    assert Config.from_dict(as_dict) == config
    target = tmp_path / "out" / "config.yaml"
    dump_config(config, target)
    assert load_config(target) == config
    assert not [p for p in target.parent.iterdir() if p.name != "config.yaml"]


def test_configs_are_frozen_and_apply_overrides_revalidates():
    config = load_config(None, DATA)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss.kind = "reverse"
    changed = apply_overrides(config, ["loss.kind=reverse", "optim.max_steps=2"])
    assert changed.loss.kind == "reverse" and changed.optim.max_steps == 2 and config.loss.kind == "forward"
    with pytest.raises(ValueError, match="teacher.mode=sync needs"):
        apply_overrides(config, ["teacher.mode=sync"])
    validate_config(changed)


def test_from_dict_checks_types_but_not_cross_field_rules():
    assert Config.from_dict({"teacher": {"mode": "sync"}}).teacher.mode == "sync"
    with pytest.raises(ValueError, match="teacher.mode: got 'live'"):
        Config.from_dict({"teacher": {"mode": "live"}})
    assert LossConfig.from_dict({"kind": "reverse"}).kind == "reverse"


@pytest.mark.parametrize("override, expected", [
    ("loss.kind", r"override 'loss.kind' is not of the form key=value"),
    ("loss..kind=x", r"malformed key 'loss..kind'"),
    ("eval.benchmarks[3].name=x", r"index 3 is out of range for eval.benchmarks \(0 entries\)"),
    ("loss.kind.inner=x", r"loss.kind is a single value \(one of 'forward'"),
    ("data.path.x=1", r"data.path is a single value \(str or null\)"),
    ("loss.kind=[unclosed", r"override 'loss.kind=\[unclosed': the value is not valid YAML"),
])
def test_malformed_overrides(override, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, DATA + [override])


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    path = write(tmp_path, "seed: 1\nloss:\n  kind: [reverse\n", "broken.yaml")
    with pytest.raises(ValueError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)
    path = write(tmp_path, "- seed\n", "list.yaml")
    with pytest.raises(ValueError, match=rf"{path}:1: the top level of a config must be a mapping"):
        load_config(path)
    path = write(tmp_path, "loss:\n  kind: forward\n  beta: 0.2\n  kind: reverse\n", "dup.yaml")
    with pytest.raises(ValueError, match=rf"{path}:4: duplicate key 'loss.kind' \(first given at line 2\)"):
        load_config(path)
