"""Every recipe parses, plans and (multi-node ones) shards at its true world size;
recipe mistakes are one line (more of them in test_recipe_errors.py)."""

import dataclasses
import glob
import os

import pytest

from tiedmoe_titan.config import RecipeError, load_recipe, parse_recipe, write_resolved_recipe
from tiedmoe_titan.preflight import check_run
from tiedmoe_titan.plan import plan, shard_dry_run

DEBUG = os.path.abspath("recipes/debug_cpu.toml")
RECIPES = sorted(p for p in glob.glob("recipes/**/*.toml", recursive=True) if not p.endswith("base.toml"))


def world_size(job_config) -> int:
    p = job_config.parallelism
    return max(p.data_parallel_shard_degree, 1) * p.data_parallel_replicate_degree * p.tensor_parallel_degree * p.context_parallel_degree * p.pipeline_parallel_degree


def test_the_grid_is_complete():
    for family in ("olmoe", "qwen3", "deepseek"):
        names = {p.split("/")[-1] for p in RECIPES if f"/{family}/" in p}
        assert {f"regular_{v}.toml" for v in ("g1", "g2", "g4", "g4_x2", "g4_x4", "narrow")} <= names


@pytest.fixture(scope="module")
def cluster_corpus(tmp_path_factory):
    """Token shards with enough samples for one batch of the biggest recipe (the recipes
    point at the bundled corpus, far too small for a 64-GPU global batch)."""
    import numpy as np
    from test_data import make_shards

    from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH, load_tokenizer

    need = 0
    for recipe in RECIPES:
        t, v, world = (c := parse_recipe(recipe)).training, c.validation, world_size(c)
        need = max(need, (t.seq_len + 1) * max(t.global_batch_size, t.local_batch_size * world), (v.seq_len + 1) * v.local_batch_size * world)
    folder = tmp_path_factory.mktemp("cluster_corpus") / "shards"
    return make_shards(folder, [np.arange(need) % 2048], load_tokenizer(DEFAULT_TOKENIZER_PATH))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_parses_plans_and_checks(recipe, cluster_corpus):
    job_config = parse_recipe(recipe, ["--training.dataset_path", cluster_corpus, "--validation.dataset_path", cluster_corpus])
    p = plan(job_config)
    assert p["total_params"] > 0 and p["active_params"] <= p["total_params"]
    world = world_size(job_config)
    check_run(job_config, world)
    if world > 1:  # multi-node: build and shard at the true world size on the fake backend
        dry = shard_dry_run(job_config, world)
        assert dry["world_size"] == world
        # fp32 experts split over the sharding ranks (HSDP replicas hold copies), up to FSDP padding.
        shards = world // job_config.parallelism.data_parallel_replicate_degree
        assert abs(dry["per_rank_expert_param_bytes"] - 4 * p["expert_params"] / shards) <= 4 * 3 * p["num_banks"] * 1024


def test_grid_recipes_differ_only_in_tying():
    base = load_recipe("recipes/olmoe/regular_g1.toml")
    for variant in ("g2", "g4", "g4_x2", "g4_x4", "narrow"):
        values = load_recipe(f"recipes/olmoe/regular_{variant}.toml")
        assert {k for k in values if values[k] != base[k]} == {"job", "tying"}
        assert values["job"].keys() == {"dump_folder"}
    qwen = load_recipe("recipes/qwen3/regular_g4.toml")
    assert {k for k in qwen if qwen[k] != load_recipe("recipes/olmoe/regular_g4.toml")[k]} == {"job", "model"}


def write(tmp_path, text: str, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_extends_merges_tables(tmp_path):
    write(tmp_path, '[training]\nsteps = 5\nseq_len = 64\n', "base.toml")
    child = write(tmp_path, 'extends = "base.toml"\n[training]\nsteps = 7\n')
    assert load_recipe(child)["training"] == {"steps": 7, "seq_len": 64}
    loop = write(tmp_path, 'extends = "loop.toml"\n', "loop.toml")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(loop)


@pytest.mark.parametrize(
    "text, message",
    [
        (f'extends = "{DEBUG}"\n[training]\nstep = 3\n', "unknown key [training] 'step': did you mean 'steps'?"),
        (f'extends = "{DEBUG}"\n[tyng]\ngroup_size = 3\n', "unknown key 'tyng': did you mean 'tying'?"),
        (f'extends = "{DEBUG}"\n[tying]\ngroup_size = "2"\n', "tying.group_size = '2' must be an integer"),
        (f'extends = "{DEBUG}"\n[lr_scheduler]\ndecay_type = "cosin"\n', "lr_scheduler.decay_type = 'cosin' must be one of"),
    ],
)
def test_key_and_type_mistakes(tmp_path, text, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--tying.group_size", "2", "--tying.untied_first", "4", "--tying.untied_last", "3"], "leave 1 of 8 MoE layers"),
        (["--parallelism.expert_parallel_degree", "2"], "expert_parallel_degree = 2 (x etp 1) must divide"),
        (["--parallelism.data_parallel_shard_degree", "3"], "but the world size is 1"),
        (["--training.dataset_path", "/nonexistent/*.jsonl"], "training.dataset_path: glob '/nonexistent/*.jsonl' matched no files"),
        (["--model.hf_assets_path", "/nonexistent.model"], "model.hf_assets_path"),
        (["--model.flavor", "huge"], "model.flavor = 'huge'"),
    ],
)
def test_impossible_runs_are_refused(overrides, message):
    with pytest.raises(RecipeError) as err:
        check_run(parse_recipe("recipes/debug_cpu.toml", overrides), 1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_seed_is_always_set_and_resolved_recipe_round_trips(tmp_path):
    from tiedmoe_titan.config import to_toml

    values = load_recipe("recipes/debug_cpu.toml")
    del values["debug"]["seed"]
    job_config = parse_recipe(write(tmp_path, to_toml(values)), ["--tying.group_size", "4"])
    assert job_config.debug.seed == 0
    resolved = write_resolved_recipe(job_config, str(tmp_path / "out"))
    assert dataclasses.asdict(parse_recipe(resolved)) == dataclasses.asdict(job_config)
