"""clip-retrieval's own tools on our outputs and against our server, as a clip-retrieval user would run them:

- ``clip-retrieval index`` (autofaiss) and ``clip-retrieval back`` on ``laion-spark export --format embeddings`` of
  the demo lake, the files as they are;
- clip-retrieval's ``ClipClient`` against ``laion-spark serve``.

They are PyPI's clip-retrieval 2.45.0, installed into ``.cache/peers/clip-retrieval`` (laion_spark.testing.peers:
its pins contradict ours). The demo's tiny CLIP model is registered with ``open_clip.add_model_config`` before
clip-retrieval's CLI runs, as any custom open_clip model must be; a stock model (``open_clip:ViT-B-32/...``) needs
no such line. The module skips when that environment cannot be installed.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from laion_spark.demo.__main__ import DEMO_QUERY
from laion_spark.index.search import search_lake
from laion_spark.testing.peers import CLIP_RETRIEVAL, PeerUnavailable, peer_python

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PEER_DIRECTORY = PROJECT_ROOT / ".cache" / "peers" / CLIP_RETRIEVAL.name
K = 5

# clip-retrieval's CLI with a custom open_clip model config registered first (argv: config, then the CLI's own).
REGISTERED_CLI = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
sys.argv = ["clip-retrieval", *sys.argv[2:]]
from clip_retrieval.cli import main
main()
"""

CLIENT_QUERIES = """
import json, sys
from clip_retrieval.clip_client import ClipClient
url, index, text, image, embedding = sys.argv[1:6]
client = ClipClient(url=url, indice_name=index, num_images=int(sys.argv[6]), deduplicate=False,
                    use_safety_model=False, use_violence_detector=False, aesthetic_weight=0)
print(json.dumps({"text": client.query(text=text), "image": client.query(image=image),
                  "embedding": client.query(embedding_input=json.loads(embedding))}))
"""


@pytest.fixture(scope="module")
def peer() -> Path:
    try:
        return peer_python(CLIP_RETRIEVAL, PEER_DIRECTORY)
    except PeerUnavailable as exc:
        pytest.skip(f"clip-retrieval could not be installed: {exc}")


@pytest.fixture(scope="module")
def indexed_lake(spark, demo_lake, tmp_path_factory) -> str:
    """A copy of the demo lake with our own kNN index, the reference the peer's answers are compared with."""
    from laion_spark.index import run_index

    lake = str(tmp_path_factory.mktemp("clip-retrieval") / "demo-lake")
    shutil.copytree(demo_lake.lake, lake)
    run_index(spark, demo_lake.config, lake)
    return lake


@pytest.fixture(scope="module")
def embeddings_export(spark, demo_lake, tmp_path_factory) -> Path:
    from laion_spark.export import run_export

    out = tmp_path_factory.mktemp("clip-retrieval-export") / "embeddings"
    run_export(spark, demo_lake.config, demo_lake.lake, "embeddings", str(out))
    return out


@pytest.fixture(scope="module")
def embeddings(spark, demo_lake) -> dict[str, np.ndarray]:
    """Each dataset row's image embedding, as the lake holds it."""
    from laion_spark.storage import read_table

    dataset = read_table(spark, demo_lake.lake, "dataset").select("uid")
    vectors = read_table(spark, demo_lake.lake, "embeddings").select("uid", "image_embedding")
    rows = vectors.join(dataset, "uid", "left_semi").collect()
    return {row.uid: np.asarray(row.image_embedding, dtype=np.float32) for row in rows}


def same_image(embeddings: dict[str, np.ndarray], vector: np.ndarray) -> set[str]:
    """The uids whose image embedding is ``vector`` (the same image under other alt texts)."""
    return {uid for uid, other in embeddings.items() if np.allclose(other, vector, atol=1e-3)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode("utf-8"), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 600) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"clip-retrieval back exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"clip-retrieval back did not answer {url} within {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def assert_same_neighbours(peer_results: list[dict], ours: list, context: str) -> None:
    """Same uids in the same order with the same similarities; exact ties may come in either order."""
    assert len(peer_results) == len(ours) == K, context
    theirs = [(result["uid"] if "uid" in result else None, result["similarity"]) for result in peer_results]
    np.testing.assert_allclose([s for _, s in theirs], [m.similarity for m in ours], atol=1e-3, err_msg=context)
    if theirs[0][0] is not None:
        by_score = lambda pairs: sorted(pairs, key=lambda p: (round(p[1], 3), p[0]))  # noqa: E731
        assert [u for u, _ in by_score(theirs)] == [u for u, _ in by_score([(m.uid, m.similarity) for m in ours])]


def test_clip_retrieval_index_and_back_serve_our_embeddings_export(
    peer, demo_lake, indexed_lake, embeddings_export, embeddings, tmp_path
):
    index_folder = tmp_path / "index"
    cli = peer.parent / "clip-retrieval"
    built = subprocess.run(
        [str(cli), "index", "--embeddings_folder", str(embeddings_export), "--index_folder", str(index_folder)]
        + ["--max_index_memory_usage", "1G", "--current_memory_available", "4G", "--nb_cores", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    exported_rows = sum(len(np.load(path)) for path in (embeddings_export / "img_emb").glob("*.npy"))
    for modality in ("image", "text"):
        infos = json.loads((index_folder / f"{modality}.json").read_text())  # autofaiss's own record of the build
        assert infos["nb vectors"] == exported_rows == len(embeddings)
    assert sorted(p.name for p in (index_folder / "metadata").iterdir()) == ["metadata_0.parquet"]

    indices = tmp_path / "indices_paths.json"
    indices.write_text(json.dumps({"demo": str(index_folder)}))
    port, log = free_port(), tmp_path / "back.log"
    clip = demo_lake.config.clip
    back = [str(peer), "-c", REGISTERED_CLI, clip.model_config, "back", "--indices_paths", str(indices)]
    back += ["--port", str(port), "--clip_model", f"open_clip:{clip.model}/{clip.pretrained}", "--use_jit", "False"]
    back += ["--enable_mclip_option", "False", "--provide_aesthetic_embeddings", "False"]
    back += ["--columns_to_return", '["url","caption","uid"]']
    with log.open("w") as output:
        process = subprocess.Popen(back, stdout=output, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(f"{base}/indices-list", process, log) == ["demo"]

        # A text query, embedded by clip-retrieval with the lake's model: the same neighbours as our search.
        found = post(
            f"{base}/knn-service",
            {"text": DEMO_QUERY, "modality": "image", "num_images": K, "indice_name": "demo", "deduplicate": False},
        )
        ours = search_lake(demo_lake.config, indexed_lake, text=DEMO_QUERY, k=K)
        assert_same_neighbours(found, ours, "text query through clip-retrieval back")
        assert "yellow star" in found[0]["caption"].lower()

        # A lake embedding as the query finds its own row first, with its url and caption from our metadata.
        uid, vector = sorted(embeddings.items())[0]
        found = post(
            f"{base}/knn-service",
            {
                "embedding_input": vector.tolist(),
                "modality": "image",
                "num_images": K,
                "indice_name": "demo",
                "deduplicate": False,
            },
        )
        # Its own row first, or a row of the very same image: the demo serves some images under several alt texts,
        # and such ties come in the export's row order.
        assert found[0]["uid"] in same_image(embeddings, vector) and uid in {result["uid"] for result in found}
        assert found[0]["similarity"] == pytest.approx(1.0, abs=1e-3)

        # /metadata maps clip-retrieval's ids (row numbers of the export) back to our rows.
        ids = [result["id"] for result in found]
        metadata = post(f"{base}/metadata", {"ids": ids, "indice_name": "demo"})
        assert [entry["id"] for entry in metadata] == ids
        assert [entry["metadata"]["uid"] for entry in metadata] == [result["uid"] for result in found]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_clip_retrieval_client_queries_laion_spark_serve(peer, spark, demo_lake, indexed_lake, embeddings, tmp_path):
    from laion_spark.index.serve import index_name, make_server

    config = copy.deepcopy(demo_lake.config)
    server = make_server(config, indexed_lake, host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uid, vector = sorted(embeddings.items())[-1]
        query_image = tmp_path / "query.jpg"
        query_image.write_bytes(dataset_image(spark, demo_lake.lake, uid))
        done = subprocess.run(
            [str(peer), "-c", CLIENT_QUERIES, f"{server.url}/knn-service", index_name(indexed_lake), DEMO_QUERY]
            + [str(query_image), json.dumps(vector.tolist()), str(K)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        answers = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.shutdown()
        server.server_close()

    ours = search_lake(config, indexed_lake, text=DEMO_QUERY, k=K)
    assert_same_neighbours(answers["text"], ours, "ClipClient text query against laion-spark serve")
    assert [result["url"] for result in answers["text"]] == [match.url for match in ours]
    ours = search_lake(config, indexed_lake, image_path=str(query_image), k=K)
    assert_same_neighbours(answers["image"], ours, "ClipClient image query against laion-spark serve")
    assert answers["embedding"][0]["uid"] in same_image(embeddings, vector)
    assert answers["embedding"][0]["similarity"] == pytest.approx(1.0, abs=1e-3)


def dataset_image(spark, lake: str, uid: str) -> bytes:
    from laion_spark.storage import read_table

    (row,) = read_table(spark, lake, "images").where(f"uid = '{uid}'").select("image").collect()
    return bytes(row.image)
