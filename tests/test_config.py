import dataclasses
import textwrap

import pytest

from sdft.config import (BenchmarkConfig, Config, ObjectiveConfig, apply_overrides,
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
    assert config.objective.targets == "full" and config.objective.full.kind == "forward" and config.objective.is_clip == 2.0
    assert config.objective.skip_first_n_tokens == 3 and config.objective.reduction == "seq_mean"
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
        objective:
          full:
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
    config = load_config(path, ["objective.full.kind=reverse", "teacher.mode=ema", "optim.max_steps=null",
                                "eval.benchmarks[0].max_items=4", "student.lora_target_modules=[q_proj, v_proj]",
                                "objective.full.kind=forward"])
    assert config.seed == 7 and config.run_name == "tool"
    assert config.objective.full.kind == "forward" and config.objective.full.beta == 0.25
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
        "objective.is_clip=null", "data.system_prompt=You are: helpful"])
    assert config.run_name == "2024"
    assert config.model.name == "my-org/model-1.5B" and config.model.gradient_checkpointing is True
    assert config.optim.micro_batch_size == 4 and config.optim.lr == 1e-3
    assert config.eval.benchmarks[0].kind == "heldout" and config.eval.benchmarks[0].path is None
    assert config.objective.is_clip is None
    assert config.data.system_prompt == "You are: helpful"


def test_empty_yaml_and_empty_sections_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "\n"), DATA) == load_config(None, DATA)
    assert load_config(write(tmp_path, "objective:\nteacher:\n", "b.yaml"), DATA).objective == ObjectiveConfig()


def test_unknown_key_in_yaml_names_key_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, """
        seed: 1
        objective:
          full:
            kind: reverse
          tempreature: 2.0
    """)
    with pytest.raises(ValueError) as error:
        load_config(path, DATA)
    message = str(error.value)
    assert "'objective.tempreature'" in message
    assert f"{path}:5" in message
    assert "did you mean 'objective.temperature'" in message
    assert "targets, reduction, skip_first_n_tokens" in message


def test_moved_keys_name_their_new_place(tmp_path):
    path = write(tmp_path, """
        loss:
          targets: topk
          topk: 20
          kind: forward
    """)
    with pytest.raises(ValueError) as error:
        load_config(path, DATA)
    message = str(error.value)
    assert f"loss ({path}:1): this section has moved" in message
    for old, new in (("loss.targets", "objective.targets"), ("loss.topk", "objective.topk.k"),
                     ("loss.kind", "objective.full.kind")):
        assert f"{old} -> '{new}'" in message
    with pytest.raises(ValueError, match=r"override 'loss.topk_kind=forward_kl': the key 'loss.topk_kind' has moved: "
                                         r"use 'objective.topk.kind' instead"):
        load_config(None, DATA + ["loss.topk_kind=forward_kl"])


def test_unknown_top_level_key_and_section(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'optimizer'.*:2\).*did you mean 'optim'.*top level: seed"):
        load_config(write(tmp_path, "seed: 1\noptimizer:\n  lr: 1.0\n"))
    with pytest.raises(ValueError, match=r"unknown key 'objective.kindd' \(override 'objective.kindd=x'\)"):
        load_config(None, DATA + ["objective.kindd=x"])


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
    ("objective.full.beta=high", r"objective.full.beta .*got 'high'; expected a float"),
    ("student.lora_target_modules=q_proj", r"student.lora_target_modules .*expected a list of str"),
    ("objective=3", r"objective .*expected a mapping with keys targets, reduction"),
    ("eval.benchmarks=[{name: x, kind: tasks, path: p, max_items: many}]",
     r"eval.benchmarks\[0\].max_items .*got 'many'; expected an int"),
    ("optim.lr=nan", r"optim.lr .*got nan"),
    ("optim.lr=inf", r"optim.lr .*got inf; expected a finite number"),
    ("objective.temperature=.inf", r"objective.temperature .*got inf; expected a finite number"),
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
    ("objective.full.beta=1.5", "a value in [0, 1]"),
    ("teacher.ema_alpha=0", "a value in (0, 1]"),
    ("student.lora_dropout=1.0", "a value in [0, 1)"),
    ("student.lora_rank=0", "a value >= 1"),
    ("objective.temperature=-1", "a value > 0"),
    ("objective.skip_first_n_tokens=-1", "a value >= 0"),
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
        load_config(None, DATA + ["objective.full.kind=revers"])
    assert str(error.value) == ("objective.full.kind (override 'objective.full.kind=revers'): got 'revers'; allowed values: "
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
    (["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B", "objective.targets=topk"],
     r"backend.kind=tinker with teacher.mode=ema: the teacher can only be the base model or a saved copy .*"
     r"cannot average weights\); allowed: teacher.mode=static, teacher.mode=sync"),
    (["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B", "teacher.mode=static"],
     r"objective.targets=full: it needs the teacher's hidden .*exposes top-K log-probs.*use "
     r"objective.targets=topk or objective.targets=sampled"),
    (["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B", "teacher.mode=static",
      "objective.targets=topk", "objective.temperature=0.5"], r"objective.temperature=0.5: .*allowed: "
                                                              r"objective.temperature=1.0"),
    (["backend.kind=tinker", "backend.tinker_base_model=Qwen/Qwen3-8B", "teacher.mode=static",
      "objective.targets=topk", "student.mode=full"], r"student.mode=full.*allowed: student.mode=lora"),
    (["backend.kind=tinker", "teacher.mode=static", "objective.targets=topk"], r"backend.tinker_base_model"),
    (["objective.topk.kind=reverse_kl", "objective.topk.normalize=tail"],
     r"objective.topk.kind=reverse_kl compares the renormalized top-K distributions"),
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
                                       "teacher.mode=sync", "teacher.sync_every=10", "objective.targets=topk"])
    assert tinker.backend.kind == "tinker" and tinker.teacher.sync_every == 10
    sampled = load_config(None, DATA + ["objective.targets=sampled"])
    assert sampled.objective.targets == "sampled"


def test_round_trip_through_dict_and_yaml(tmp_path):
    config = load_config(None, DATA + [
        "objective.full.kind=jsd", "teacher.template=Q $orig_content A $output_text", "optim.max_steps=3",
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
        config.objective.full.kind = "reverse"
    changed = apply_overrides(config, ["objective.full.kind=reverse", "optim.max_steps=2"])
    assert changed.objective.full.kind == "reverse" and changed.optim.max_steps == 2 and config.objective.full.kind == "forward"
    with pytest.raises(ValueError, match="teacher.mode=sync needs"):
        apply_overrides(config, ["teacher.mode=sync"])
    validate_config(changed)


def test_from_dict_checks_sections_but_not_cross_section_rules():
    data = {"data": {"path": "x"}}
    tinker = Config.from_dict({**data, "backend": {"kind": "tinker"}})  # validate_config would need a base model
    assert tinker.backend.kind == "tinker"
    with pytest.raises(ValueError, match="backend.tinker_base_model"):
        validate_config(tinker)
    with pytest.raises(ValueError, match="teacher.mode: got 'live'"):
        Config.from_dict({**data, "teacher": {"mode": "live"}})
    with pytest.raises(ValueError, match="teacher.mode=sync needs teacher.sync_every"):
        Config.from_dict({**data, "teacher": {"mode": "sync"}})
    assert ObjectiveConfig.from_dict({"full": {"kind": "reverse"}}).full.kind == "reverse"


@pytest.mark.parametrize("override, expected", [
    ("objective.full.kind", r"override 'objective.full.kind' is not of the form key=value"),
    ("loss..kind=x", r"malformed key 'loss..kind'"),
    ("eval.benchmarks[3].name=x", r"index 3 is out of range for eval.benchmarks \(0 entries\)"),
    ("objective.full.kind.inner=x", r"objective.full.kind is a single value \(one of 'forward'"),
    ("data.path.x=1", r"data.path is a single value \(str or null\)"),
    ("objective.full.kind=[unclosed", r"override 'objective.full.kind=\[unclosed': the value is not valid YAML"),
])
def test_malformed_overrides(override, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, DATA + [override])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config '.*missing.yaml' is neither a file nor a shipped config; "
                                                r"shipped configs: .*quickstart"):
        load_config(tmp_path / "missing.yaml")
    path = write(tmp_path, "seed: 1\nloss:\n  kind: [reverse\n", "broken.yaml")
    with pytest.raises(ValueError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)
    path = write(tmp_path, "- seed\n", "list.yaml")
    with pytest.raises(ValueError, match=rf"{path}:1: the top level of a config must be a mapping"):
        load_config(path)
    path = write(tmp_path, "objective:\n  targets: full\n  reduction: sum\n  targets: topk\n", "dup.yaml")
    with pytest.raises(ValueError, match=rf"{path}:4: duplicate key 'objective.targets' \(first given at line 2\)"):
        load_config(path)
