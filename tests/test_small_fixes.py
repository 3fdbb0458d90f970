"""Small things a new user meets: an empty shard's skip message, img/s on the progress bar."""

import io
import tarfile
import time

from fitdist.config import WandbConfig
from fitdist.data.stream import _Stats, read_shard
from fitdist.logger import Logger, bar_postfix


def test_empty_shard_is_named_without_a_key(tmp_path):
    shard = tmp_path / "train-000003.tar"
    with tarfile.open(shard, "w"):
        pass  # a shard with no samples, although its manifest lists 5
    stats = _Stats()
    assert list(read_shard(str(shard), 5, None, stats)) == []
    ((where, why),) = stats.messages
    assert "None" not in where and "train-000003" in where, where
    assert "5 of 5 samples missing" in why and stats.skipped == 5


def test_a_damaged_shard_still_names_the_last_good_key(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        data = b"x"
        info = tarfile.TarInfo("k1.cls")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    stats = _Stats()
    assert len(list(read_shard(str(shard), 3, None, stats))) == 1
    assert stats.messages[0][0].endswith("after k1"), stats.messages


def test_progress_bar_shows_images_per_second(tmp_path):
    assert bar_postfix({"train/loss": 1.5}, 2.0, 128) == {"loss": "1.5", "img/s": "256"}
    assert "img/s" not in bar_postfix({"train/loss": 1.5}, None, 128)  # no rate yet
    logger = Logger(tmp_path, "r", {"train": {"batch_size": 64}}, WandbConfig(mode="disabled"), None)
    logger.tty = True  # the bar is drawn on terminals only
    try:
        for step in range(0, 40, 10):
            logger.progress("train", step, 100, {"train/loss": 1.0})
            time.sleep(0.02)
        assert "img/s=" in logger._bar.postfix, logger._bar.postfix
    finally:
        logger.finish()
