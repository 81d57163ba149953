"""The inversion half of MemoRa through a real ComfyUI server (python main.py --cpu) with the pack installed."""

from __future__ import annotations

import json
import time
import urllib.request
import numpy as np
import pytest
from PIL import Image

from comfy_server import ComfyServerProcess
from graphs import Graph


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.server
def test_inversion_slerp_regeneration_graph_over_http(tmp_path, tiny_ckpt_path, comfy_path, repo_root, testkit_dir):
    base = tmp_path / "server"
    (base / "input").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(base / "input" / f"concept_{i}.png")
    packs = {"comfyui-memora": repo_root, "memora_testkit": testkit_dir}
    with ComfyServerProcess(comfy_path, base, packs=packs, checkpoints=(tiny_ckpt_path,)) as server:
        info = _get(server.url + "/object_info/MemoRaDDIMInversion")["MemoRaDDIMInversion"]
        assert info["display_name"] == "MemoRa DDIM Inversion"
        assert "KSamplerAdvanced" in info["description"]
        g = Graph()
        ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt_path.name)
        pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=ck[1])
        neg = g.node("CLIPTextEncode", text="", clip=ck[1])
        lats = []
        for i in range(2):
            img = g.node("LoadImage", image=f"concept_{i}.png")
            lats.append(g.node("VAEEncode", pixels=img[0], vae=ck[2]))
        inv = [g.node("MemoRaDDIMInversion", model=ck[0], positive=pos[0], negative=neg[0], latent=lat[0],
                      steps=10, start_at_step=3, cfg=3.0, refine_iterations=1, schedule="exact") for lat in lats]
        sl = g.node("MemoRaSlerpLatents", latent_a=inv[0][0], latent_b=inv[1][0], intervals=4, include_endpoints=True)
        rg = g.node("MemoRaRegenerate", model=ck[0], positive=pos[0], negative=neg[0], latent=sl[0], steps=10,
                    start_at_step=3, cfg=3.0, schedule="exact")
        dec = g.node("VAEDecode", samples=rg[0], vae=ck[2])
        save = g.node("SaveImage", images=dec[0], filename_prefix="memora_server/regenerated")
        resp = _post(server.url + "/prompt", {"prompt": g.prompt, "client_id": "memora-test"})
        assert not resp.get("node_errors"), resp
        pid = resp["prompt_id"]
        deadline = time.monotonic() + 600
        hist = {}
        while time.monotonic() < deadline:
            hist = _get(server.url + f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    break
            time.sleep(1)
        entry = hist.get(pid)
        assert entry, f"no history for {pid}:\n{server.log_tail()}"
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
        images = entry["outputs"][save.id]["images"]
        assert len(images) == 5  # 1 pair x 5 points
        for im in images:
            path = base / "output" / im["subfolder"] / im["filename"]
            assert path.is_file()
            with Image.open(path) as pic:
                assert pic.size == (64, 64)
        # A bad graph is refused by validation with the node's specific message, before anything runs.
        bad = json.loads(json.dumps(g.prompt))
        bad[sl.id]["inputs"]["intervals"] = 0
        req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": bad}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400
