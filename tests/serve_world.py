"""What the service tests share: a store with embeddings, a gallery index and a diagnosis
checkpoint (`serve_world`, session-scoped, read-only), a real uvicorn server on a free loopback
port in a thread (`LiveServer`), and a free port."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PRETRAINED = REPO / "tests" / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """`app` served by uvicorn on 127.0.0.1 in a thread of this process, for a `with` block."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def serve_world(synth_store, synth_cohort, tmp_path_factory) -> dict:
    """A copy of the session store embedded with the committed pretrained checkpoint (feature
    set `emb`), its gallery index and an (untrained-head) diagnosis checkpoint. Read-only:
    copy before changing it."""
    pytest.importorskip(
        "fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'"
    )
    import torch

    from retrieval.embed import embed_store
    from retrieval.index import index_from_features
    from training.models.checkpoint_file import load_encoder, save_checkpoint
    from training.models.classifier import DiagnosisModel

    base = tmp_path_factory.mktemp("serve")
    store = base / "store"
    shutil.copytree(synth_store, store)
    pt = base / "pretrain.pt"
    shutil.copy(PRETRAINED, pt)
    embed_store(store, pt, "emb", progress=False)
    index_from_features(store, "emb", split="gallery").save(base / "gallery")
    torch.manual_seed(0)
    model = DiagnosisModel(load_encoder(pt))
    dx = save_checkpoint(
        base / "dx.pt", kind="diagnosis", encoder_config=model.encoder.cfg, model=model.state_dict()
    )
    return {
        "base": base,
        "store": store,
        "index": base / "gallery.faiss",
        "pt": pt,
        "dx": Path(dx),
        "cohort": synth_cohort,
    }
