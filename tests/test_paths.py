"""Path-typed config fields (issue 20 points 2-3): found from the config's types, resolved against
the directory the user runs from."""
import dataclasses
import typing

from refine_ray.config import ExperimentConfig, load_config, path_fields

ALL_PATHS = ["model.path=m", "tokenizer.path=t", "data.path=[a.parquet, b.parquet]", "train.output_dir=o",
             "train.resume_from=r", "train.val_path=v.parquet", "reward.encoder=e"]


def _set_every_path(tmp_path):
    for name in ("m", "t"):
        (tmp_path / name).mkdir()
    return [f"{o.split('=')[0]}={tmp_path}/{o.split('=')[1]}" if "[" not in o else
            f"data.path=[{tmp_path}/a.parquet, {tmp_path}/b.parquet]" for o in ALL_PATHS]


def test_path_fields_lists_every_path_typed_field_from_the_types(tmp_path):
    cfg = load_config(None, _set_every_path(tmp_path))
    found = path_fields(cfg)
    assert sorted(found) == ["data.path", "model.path", "reward.encoder", "tokenizer.path", "train.output_dir",
                             "train.resume_from", "train.val_path"]
    assert found["data.path"] == [f"{tmp_path}/a.parquet", f"{tmp_path}/b.parquet"]
    assert list(path_fields(cfg, output=True)) == ["train.output_dir"]
    assert "train.output_dir" not in path_fields(cfg, output=False)
    # fields left None are not listed
    assert sorted(path_fields(ExperimentConfig())) == ["data.path", "train.output_dir"]


def _string_fields(cls, key=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _string_fields(hints[f.name], dotted)
        elif typing.get_origin(hints[f.name]) is not dict and str in (hints[f.name], *typing.get_args(hints[f.name])):
            yield dotted


def test_every_string_field_is_path_typed_or_known_not_to_be_a_path(tmp_path):
    """A new string field holding a path must be marked, or submit_job and path resolution miss it."""
    marked = set(path_fields(load_config(None, _set_every_path(tmp_path))))
    not_paths = {"name", "model.type", "data.text_column", "data.answer_column", "system.ray_address", "eval.backend",
                 "train.project"}
    assert set(_string_fields(ExperimentConfig)) - not_paths == marked
