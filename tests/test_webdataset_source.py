"""The WebDataset tar-shard source: keys, captions, shuffling, splitting, patterns, errors."""

import http.server
import io
import os
import shutil
import tarfile
import threading

import numpy as np
import pytest
import webdataset
from PIL import Image

from fluxflow_jax.data.errors import DataConfigError
from fluxflow_jax.data.samples import BadSampleError, decode_image
from fluxflow_jax.data.webdataset_source import WebDatasetSource

SHARDS, PER_SHARD = 4, 6


def png(value, size=(8, 12)):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path, samples):
    with webdataset.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def sample(key, prompt, **members):
    return {"__key__": key, "png": png(len(key)), "json": {"prompt": prompt, "id": key},
            **members}


@pytest.fixture
def shards(tmp_path):
    for s in range(SHARDS):
        write_shard(tmp_path / f"shard-{s:06d}.tar", [
            sample(f"s{s}i{i}", f"caption {s} {i}", txt=f"text {s}-{i}") for i in range(PER_SHARD)
        ])
    return tmp_path


def everything(source, **kwargs):
    return list(source.iterate(**{"seed": 0, "epoch": 0, **kwargs}))


def keys(samples):
    return [s.key.rsplit("#", 1)[1] for s in samples]


ALL_KEYS = sorted(f"s{s}i{i}" for s in range(SHARDS) for i in range(PER_SHARD))


def test_samples_carry_image_bytes_and_json_caption(shards):
    source = WebDatasetSource(str(shards / "shard-*.tar"), image_key="png", samples_per_shard=6)
    assert source.samples_per_epoch == SHARDS * PER_SHARD
    samples = everything(source)
    assert sorted(keys(samples)) == ALL_KEYS
    first = next(s for s in samples if s.key.endswith("#s2i3"))
    assert first.key == f"{shards / 'shard-000002.tar'}#s2i3"
    assert first.caption == "caption 2 3"
    assert isinstance(first.image, bytes)
    image = decode_image(first)
    assert image.size == (12, 8) and image.getpixel((0, 0)) == (4, 4, 4)


def test_caption_from_a_text_member_with_prefix(shards):
    source = WebDatasetSource(str(shards / "shard-000001.tar"), image_key="PNG",
                              caption_key="txt", fixed_prompt_prefix="photo")
    assert sorted(s.caption for s in everything(source)) == [
        f"photo. text 1-{i}" for i in range(PER_SHARD)]


def test_caption_newlines_become_spaces(tmp_path):
    shard = write_shard(tmp_path / "x.tar", [sample("k", "  two\nlines\r\nhere ")])
    [only] = everything(WebDatasetSource(str(shard), image_key="png"))
    assert only.caption == "two lines here"


def test_order_is_a_function_of_seed_and_epoch(shards):
    source = WebDatasetSource(str(shards / "*.tar"), image_key="png", shardshuffle=4, shuffle=10)
    order = keys(everything(source, seed=1, epoch=0))
    assert keys(everything(source, seed=1, epoch=0)) == order
    other_epoch = keys(everything(source, seed=1, epoch=1))
    other_seed = keys(everything(source, seed=2, epoch=0))
    assert sorted(other_epoch) == sorted(other_seed) == sorted(order) == ALL_KEYS
    assert other_epoch != order and other_seed != order


def test_no_shuffle_keeps_the_shard_order(shards):
    source = WebDatasetSource(str(shards / "*.tar"), image_key="png", shardshuffle=0, shuffle=0)
    assert keys(everything(source, seed=5, epoch=3)) == ALL_KEYS


@pytest.mark.parametrize("pattern, count", [("shard-*.tar", 4), ("shard-00000[0-1].tar", 2),
                                            ("shard-{000000..000002}.tar", 3)])
def test_split_over_readers_covers_every_sample_once(shards, pattern, count):
    """Four shards split by shard over 2 readers; 2 or 3 shards over 4 readers: by sample."""
    source = WebDatasetSource(str(shards / pattern), image_key="png")
    for readers in (2, 4):
        parts = [keys(everything(source, seed=3, epoch=1, shard_index=i, shard_count=readers))
                 for i in range(readers)]
        merged = [key for part in parts for key in part]
        assert sorted(merged) == [k for k in ALL_KEYS if int(k[1]) < count]
        assert all(parts)


def test_samples_per_epoch_caps_the_epoch_across_readers(shards):
    source = WebDatasetSource(str(shards / "*.tar"), image_key="png", samples_per_epoch=7)
    assert source.samples_per_epoch == 7
    assert len(everything(source)) == 7
    parts = [everything(source, shard_index=i, shard_count=2) for i in range(2)]
    assert [len(part) for part in parts] == [4, 3]


def test_list_of_patterns_keeps_their_order(shards):
    source = WebDatasetSource([str(shards / "shard-000003.tar"),
                               str(shards / "shard-00000{0,1}.tar")], image_key="png")
    assert [p.rsplit("/", 1)[1] for p in source.shards] == [
        "shard-000003.tar", "shard-000000.tar", "shard-000001.tar"]


def test_patterns_that_match_nothing_are_named(shards):
    with pytest.raises(DataConfigError, match=r"no WebDataset shards match '.*other-\*.tar'"):
        WebDatasetSource(str(shards / "other-*.tar"))
    with pytest.raises(DataConfigError, match=r"shard .*shard-000004.tar \(from '.*'\) does not"):
        WebDatasetSource(str(shards / "shard-{000002..000009}.tar"))
    with pytest.raises(DataConfigError, match="no WebDataset URLs given"):
        WebDatasetSource([])


def test_wrong_key_on_the_first_sample_lists_the_members(shards):
    source = WebDatasetSource(str(shards / "shard-000000.tar"))  # image_key "jpg" by default
    with pytest.raises(DataConfigError) as err:
        everything(source)
    assert "no 'jpg' member (it has: json, png, txt); set image_key" in str(err.value)
    source = WebDatasetSource(str(shards / "shard-000000.tar"), image_key="png",
                              caption_key="caption")
    with pytest.raises(DataConfigError, match=r"'json' has no 'caption' field \(it has: prompt, "
                                              r"id\); set caption_key"):
        everything(source)
    source = WebDatasetSource(str(shards / "shard-000000.tar"), image_key="png",
                              label_key="txt")
    with pytest.raises(DataConfigError, match="'txt' member is not JSON; set label_key"):
        everything(source)


def test_keys_are_checked_once_so_a_shuffled_bad_sample_stays_a_bad_sample(tmp_path):
    """Seed 0 puts b.tar, which opens with a sample without JSON, first in epochs 1 to 3."""
    no_json = {"png": png(1), "txt": "x"}
    write_shard(tmp_path / "a.tar", [sample("a0", "fine"), {"__key__": "a1", **no_json}])
    write_shard(tmp_path / "b.tar", [{"__key__": "b0", **no_json}, sample("b1", "fine")])
    source = WebDatasetSource(str(tmp_path / "*.tar"), image_key="png")
    for epoch in range(4):
        samples = everything(source, seed=0, epoch=epoch)
        assert sorted(keys(samples)) == ["a0", "a1", "b0", "b1"]
        captions = {key: s.caption for key, s in zip(keys(samples), samples, strict=True)}
        assert captions == {"a0": "fine", "a1": "", "b0": "", "b1": "fine"}


def test_wrong_key_is_found_on_the_first_listed_shard_by_every_reader(tmp_path):
    write_shard(tmp_path / "a.tar", [{"__key__": "a0", "png": png(1), "txt": "x"},
                                     sample("a1", "fine")])
    write_shard(tmp_path / "b.tar", [sample("b0", "fine")])
    for shard_index in range(2):
        source = WebDatasetSource(str(tmp_path / "*.tar"), image_key="png")
        with pytest.raises(DataConfigError, match=r"a.tar#a0: no 'json' member \(it has: png, "
                                                  r"txt\); set label_key"):
            source.iterate(seed=0, epoch=0, shard_index=shard_index, shard_count=2)


def test_bad_samples_stay_in_the_stream_with_nothing_usable(tmp_path):
    """Later samples without an image or caption arrive empty, for the loader to count."""
    shard = write_shard(tmp_path / "mixed.tar", [
        sample("a", "fine"), sample("b", " \n "), {"__key__": "c", "png": png(1)},
        {"__key__": "d", "png": png(1), "json": b"{not json"},
        {"__key__": "e", "png": png(1), "json": {"id": "e"}},
        {"__key__": "f", "png": png(1), "json": {"prompt": 3}},
        {"__key__": "g", "json": {"prompt": "no image"}}, sample("h", "also fine")])
    samples = everything(WebDatasetSource(str(shard), image_key="png", shuffle=0))
    assert keys(samples) == list("abcdefgh")
    assert [s.caption for s in samples] == ["fine", "", "", "", "", "", "no image", "also fine"]
    assert all(decode_image(s).size == (12, 8) for s in samples[:6])
    with pytest.raises(BadSampleError, match="mixed.tar#g: unreadable image"):
        decode_image(samples[6])


def test_unreadable_shard_is_logged_and_yields_one_empty_sample(shards, caplog):
    broken = shards / "shard-000001.tar"
    broken.write_bytes(b"this is not a tar archive\n" * 40)
    source = WebDatasetSource(str(shards / "shard-00000[012].tar"), image_key="png",
                              shardshuffle=0, shuffle=0)
    samples = everything(source)
    assert keys(samples[:PER_SHARD]) == [f"s0i{i}" for i in range(PER_SHARD)]
    marker = samples[PER_SHARD]
    assert marker.key == str(broken) and marker.image == b"" and marker.caption == ""
    assert keys(samples[PER_SHARD + 1:]) == [f"s2i{i}" for i in range(PER_SHARD)]
    assert f"shard {broken} could not be read" in caplog.text


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # curl hangs up mid-shard whenever a reader stops early


@pytest.fixture
def http_shards(shards):
    """(base URL of ``shards``, Authorization headers seen, {name: bytes sent before hanging
    up on a response that announced the whole file})."""
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    seen_headers, cuts = [], {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(shards), **kwargs)

        def do_GET(self):
            seen_headers.append(self.headers.get("Authorization"))
            name = self.path.lstrip("/")
            if name not in cuts:
                return super().do_GET()
            data = (shards / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cuts[name]])

        def log_message(self, *args):
            pass

    server = QuietServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen_headers, cuts
    server.shutdown()
    server.server_close()


def test_http_shards_stream_through_curl_with_the_token(http_shards, caplog):
    base, seen_headers, _ = http_shards
    source = WebDatasetSource(f"{base}/shard-{{000000..000001}}.tar", image_key="png",
                              token="secret")
    assert source.shards == [f"{base}/shard-000000.tar", f"{base}/shard-000001.tar"]
    samples = everything(source)
    assert len(samples) == 2 * PER_SHARD and samples[0].key.startswith(base)
    assert seen_headers == ["Bearer secret"] * 3  # the key check reads shard 0 once more
    [marker] = everything(WebDatasetSource(f"{base}/absent.tar", token="secret"))
    assert marker.key == f"{base}/absent.tar" and marker.image == b""
    assert "absent.tar could not be read" in caplog.text and "secret" not in caplog.text


def test_download_cut_off_between_members_is_an_unreadable_shard(shards, http_shards, caplog):
    base, _, cuts = http_shards
    shutil.copy(shards / "shard-000000.tar", shards / "cut.tar")
    with tarfile.open(shards / "cut.tar") as tar:
        cuts["cut.tar"] = next(m.offset for m in tar if m.name.startswith("s0i2."))
    source = WebDatasetSource(f"{base}/cut.tar", image_key="png", shuffle=0, token="secret")
    *read, marker = everything(source)
    assert keys(read) == ["s0i0", "s0i1"][:len(read)]  # curl may fail before the tar reader
    assert marker.key == f"{base}/cut.tar" and marker.image == b""
    assert "cut.tar could not be read" in caplog.text and "secret" not in caplog.text


def test_reader_stopped_early_on_purpose_logs_nothing(shards, http_shards, caplog):
    """Big samples keep curl writing into the pipe when the reader closes it."""
    base, _, _ = http_shards
    write_shard(shards / "big.tar", [sample(f"b{i}", "big", bin=os.urandom(1 << 20))
                                     for i in range(4)])
    source = WebDatasetSource(f"{base}/big.tar", image_key="png", samples_per_epoch=1, shuffle=0)
    assert keys(everything(source)) == ["b0"]
    assert "could not be read" not in caplog.text


def test_hf_patterns_resolve_to_download_urls(monkeypatch):
    """The Hub listing is replaced by a fixed answer; the pattern and URL handling are real."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    globbed = []

    class Listing:
        def __init__(self, token):
            self.token = token

        def glob(self, path):
            globbed.append((path, self.token))
            return [] if "none" in path else [f"datasets/o/r@v1/data/{n}.tar" for n in "ba"]

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", Listing)
    source = WebDatasetSource("hf://datasets/o/r@v1/data/*.tar", token="t")
    assert globbed == [("datasets/o/r@v1/data/*.tar", "t")]
    assert source.shards == [
        huggingface_hub.hf_hub_url("o/r", f"data/{n}.tar", repo_type="dataset", revision="v1")
        for n in "ab"]
    assert source.shards[0].endswith("/datasets/o/r/resolve/v1/data/a.tar")
    with pytest.raises(DataConfigError, match="no WebDataset shards match 'hf://datasets/o/r/none"):
        WebDatasetSource("hf://datasets/o/r/none/*.tar")
    with pytest.raises(DataConfigError, match="expected hf://datasets/<owner>/<repo>/"):
        WebDatasetSource("hf://models/o/r/x.tar")
