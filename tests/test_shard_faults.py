"""Faulty shards while streaming for training or evaluation: a corrupt, missing or unreadable
shard and a row that does not decode each raise a plain ShardError (a ValueError) with one
line naming the shard, in this process and across Ray's task and actor boundaries, and the
command line reports it in that one line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CONFIGS, TINY

from uniinst.cli import main
from uniinst.data.prepare import prepare_dataset, serial_executor
from uniinst.data.shards import MANIFEST_NAME, ShardError, read_manifest
from uniinst.data.transforms import TrainTransform

# A line the CLI's logging writes (HH:MM:SS LEVEL name: ...), Ray's Python logging (date
# time,ms LEVEL ...) or Ray's core ([date time,ms L pid tid] ...).
_LOG_LINE = re.compile(
    r"^(\d\d:\d\d:\d\d [A-Z]+ \S+: |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ |\[\d{4}-\d\d-\d\d [\d:,]+ [A-Z] \d+ \d+\] )"
)


@pytest.fixture(scope="module")
def synth_shards(synth_data, tmp_path_factory) -> Path:
    """The synthetic train set (8 images) as 4 local shards."""
    out = tmp_path_factory.mktemp("fault_shards") / "train"
    prepare_dataset(
        str(synth_data / "annotations" / "instances_train.json"), str(synth_data / "train"), str(out),
        images_per_shard=2, executor=serial_executor, progress=False,
    )
    return out


def _copy(shards: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the dataset and the path of its third shard (the one the tests break)."""
    shutil.copytree(shards, dest)
    return dest, dest / read_manifest(str(dest)).shards[2].path


def _flip_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def _rewrite(path: Path, data: bytes) -> None:
    """Replace a shard and record its new size and sha256 in the manifest, as a conversion
    that wrote a bad file would have: the checksum passes, the content is at fault."""
    path.write_bytes(data)
    manifest_path = path.parent / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:
        if shard["path"] == path.name:
            shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


def _break_images(path: Path, rows: range) -> pa.Table:
    """Give those rows of the shard image bytes that no decoder reads (see :func:`_rewrite`);
    returns the shard's original table."""
    table = pq.read_table(path)
    images = [b"\xff\xd8 not a jpeg" if i in rows else data for i, data in enumerate(table.column("image").to_pylist())]
    sink = pa.BufferOutputStream()
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), sink)
    _rewrite(path, sink.getvalue().to_pybytes())
    return table


def _stream(uri: Path, **kwargs):
    from uniinst.ray.train_stream import TrainStream

    transform = TrainTransform(short_edge=(48,), max_size=64)
    return TrainStream(str(uri), batch_size=2, transform=transform, shuffle_files=False, **kwargs)


def _first_error(stream) -> ShardError:
    """The error that ends ``stream`` within an epoch: a plain ShardError with one line."""
    with pytest.raises(ShardError) as caught:
        for _ in range(4):
            next(stream)
    stream.close()
    assert type(caught.value) is ShardError, type(caught.value).__mro__  # not a Ray wrapper
    assert "\n" not in str(caught.value)
    return caught.value


# --------------------------------------------------------------------------- the training command


def test_cli_train_on_a_corrupt_shard_fails_in_one_line(ray_local, synth_shards, tmp_path, capfd):
    uri, victim = _copy(synth_shards, tmp_path / "corrupt")
    _flip_middle(victim)
    overrides = [
        *TINY, "data.synthetic=false", f"data.train.shards={uri}", "data.val.json=", "solver.max_iter=8",
        "data.shuffle_buffer=0",
    ]
    code = main(["train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--output-dir", str(tmp_path / "run"), *overrides])
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "RayTaskError" not in err, err
    ours = [line for line in err.splitlines() if line.strip() and not _LOG_LINE.match(line)]
    assert ours == [ours[-1]] and ours[-1] == err.rstrip().splitlines()[-1], err
    assert re.fullmatch(rf"uniinst train: error: shard {re.escape(str(victim))} is corrupt: its sha256 is \w+, .*", ours[0])


def test_cli_ray_train_on_an_undecodable_shard_row_fails_in_one_line(ray_local, synth_shards, tmp_path, capfd):
    # The rows decode in a Ray Data task feeding a Ray Train worker: two boundaries to cross.
    uri, victim = _copy(synth_shards, tmp_path / "undecodable")
    _break_images(victim, range(2))
    overrides = [
        *TINY, "data.synthetic=false", f"data.train.shards={uri}", "data.val.json=", "solver.max_iter=8",
        "data.shuffle_buffer=0", "ray.cpus_per_worker=0.5", "ray.max_failures=2",
    ]
    run = tmp_path / "run"
    code = main(["train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--workers", "2", "--output-dir", str(run),
                 *overrides])
    err = capfd.readouterr().err
    assert code == 2, err
    # Ray forwards its processes' own logs, each line prefixed "(Name pid=...)"; the rest is ours.
    ours = [line for line in err.splitlines() if line.strip() and not line.startswith("(") and not _LOG_LINE.match(line)]
    assert ours == [err.rstrip().splitlines()[-1]], err
    assert ours[0].startswith(f"uniinst train: error: shard {victim}") and "image" in ours[0], err
    # An input error is the same on every try: the group is not restarted.
    assert '"event/resumed"' not in (run / "metrics.jsonl").read_text()


def test_cli_evaluate_on_a_corrupt_shard_fails_in_one_line(ray_local, synth_shards, tmp_path, capfd):
    from uniinst.config import load_config, to_dict
    from uniinst.engine.checkpoint import save_checkpoint
    from uniinst.modeling.uniinst import build_model

    uri, victim = _copy(synth_shards, tmp_path / "corrupt_val")
    _flip_middle(victim)
    cfg = load_config(CONFIGS / "synth_R18_uniinst.yaml", TINY)
    names = read_manifest(str(uri)).class_names
    state = {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg), "meta": {"class_names": names}}
    ckpt = save_checkpoint(state, tmp_path / "model.pt")
    code = main(["evaluate", "--shards", str(uri), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")])
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "RayTaskError" not in err, err
    ours = [line for line in err.splitlines() if line.strip() and not _LOG_LINE.match(line)]
    assert ours == [err.rstrip().splitlines()[-1]], err
    assert ours[0].startswith(f"uniinst evaluate: error: shard {victim} is corrupt"), err


# --------------------------------------------------------------------------- each fault, one line


def test_stream_errors_name_the_faulty_shard(ray_local, synth_shards, tmp_path):
    uri, victim = _copy(synth_shards, tmp_path / "faults")
    original = victim.read_bytes()

    _flip_middle(victim)
    corrupt = rf"shard {re.escape(str(victim))} is corrupt: its sha256 is [0-9a-f]{{64}}, the manifest says [0-9a-f]{{64}}"
    assert re.fullmatch(corrupt, str(_first_error(_stream(uri))))

    victim.write_bytes(original[:-100])
    message = str(_first_error(_stream(uri)))
    assert message.startswith(f"shard {victim} is {len(original) - 100} bytes but the manifest says {len(original)}")

    _rewrite(victim, b"not parquet at all" * 40)
    message = str(_first_error(_stream(uri)))
    assert message.startswith(f"shard {victim} is not a readable shard: ") and "magic bytes" in message

    victim.unlink()
    assert str(_first_error(_stream(uri))) == f"shard {victim} is listed in the manifest but does not exist"


def test_a_row_that_does_not_decode_names_the_shard_and_image(ray_local, synth_shards, tmp_path):
    uri, victim = _copy(synth_shards, tmp_path / "bad_row")
    table = _break_images(victim, range(1, 2))
    image_id, file_name = table.column("image_id")[1].as_py(), table.column("file_name")[1].as_py()
    message = str(_first_error(_stream(uri)))
    assert message.startswith(f"shard {victim} (image id {image_id}, {file_name}): cannot decode the image bytes: ")


def test_the_stream_plan_checks_the_shards_it_indexes(ray_local, synth_shards, tmp_path):
    # Before its first batch a stream reads two columns of every shard to plan the epochs.
    uri, victim = _copy(synth_shards, tmp_path / "index")
    victim.write_bytes(bytes(victim.stat().st_size))  # the size the manifest records, no Parquet in it
    error = _first_error(_stream(uri, rank=0, world_size=2))
    assert re.match(rf"shard {re.escape(str(victim))} is corrupt: ", str(error))
    victim.unlink()
    assert "is listed in the manifest but does not exist" in str(_first_error(_stream(uri, start_iter=1)))


# --------------------------------------------------------------------------- other consumers (evaluation)


def test_shard_errors_cross_a_ray_data_actor_pool_in_one_line(ray_local, synth_shards, tmp_path):
    from uniinst.ray.data import read_shards, shard_errors_unwrapped

    class DecodeAll:
        """An actor UDF over shard rows, as the evaluation's model replicas are (defined
        here so that Ray ships it by value)."""

        def __call__(self, batch: pa.Table) -> pa.Table:
            from uniinst.data.shards import decode_row
            from uniinst.ray.data import shard_errors_for_ray

            with shard_errors_for_ray():
                rows = [{**row, "annotations": []} for row in batch.to_pylist()]
                ids = [decode_row(row, {}, where="shard row").image_id for row in rows]
            return pa.table({"image_id": ids})

    uri, victim = _copy(synth_shards, tmp_path / "actors")
    _break_images(victim, range(2))
    ds, _ = read_shards(str(uri))
    predictions = ds.map_batches(DecodeAll, batch_size=2, batch_format="pyarrow", concurrency=1)
    with pytest.raises(ShardError) as caught, shard_errors_unwrapped():
        for _ in predictions.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass
    assert type(caught.value) is ShardError
    assert re.fullmatch(r"shard row \(image id \d+, [^)]+\): cannot decode the image bytes: .*", str(caught.value))

    victim.unlink()
    with pytest.raises(ShardError, match=f"^shard {re.escape(str(victim))} is listed in the manifest"):
        with shard_errors_unwrapped():
            list(read_shards(str(uri))[0].iter_batches(batch_size=None))
