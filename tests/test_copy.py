"""docs/moco.md's lines around the copied core for a multi-GPU loop (the DDP wrapper, the queue out of DDP's buffer
broadcast, the key gather) and for split batch norm on one GPU, run as printed there with moco.py's section 2 (and 4)
pasted, a ResNet-18 and a small K: the first under torchrun on 2 CPU processes (gloo), the second on one."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from test_core import IMPORTS, section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = (("resnet50", "resnet18"), ("K=65536", "K=64"), ("dim=128", "dim=16"))


def docs_block(marker):
    """The python block of docs/moco.md that contains `marker`, with the small sizes."""
    text = open(os.path.join(ROOT, "docs", "moco.md")).read()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b)
    for big, small in SMALL:
        code = code.replace(big, small)
    return code


@pytest.mark.slow
def test_ddp_loop_of_the_docs_keeps_ranks_identical(tmp_path):
    """2 ranks, each seeded differently (so the initial queues differ unless rank 0's is broadcast), 2 steps of 4
    images each on its own images: every parameter and the queue identical on both ranks afterwards (gradients
    synchronised through the wrapper's forward, the same gathered keys enqueued), the pointer at 2 x 8 keys, and the
    queue among the buffers DDP leaves alone."""
    prologue = textwrap.dedent("""
        import os
        rank = int(os.environ["RANK"])
        torch.manual_seed(100 + rank)  # every rank its own initial weights and queue: DDP and the broadcast align them
        g = torch.Generator().manual_seed(rank)
        loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)) for _ in range(2)]
        """)
    epilogue = textwrap.dedent(f"""
        torch.save({{"params": {{k: p.detach() for k, p in model.named_parameters()}}, "queue": model.queue,
                    "ptr": model.queue_ptr, "ignored": sorted(net.parameters_to_ignore)}},
                   os.path.join({str(tmp_path)!r}, f"rank{{rank}}.pt"))
        dist.destroy_process_group()
        """)
    path = tmp_path / "train.py"
    path.write_text(IMPORTS + "import torchvision\n" + section("moco.py", 2) + prologue + docs_block("TrainingLoss")
                    + epilogue)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ptr"].item() == r1["ptr"].item() == 16
    assert r0["ignored"] == ["model.queue", "model.queue_ptr"]  # not broadcast by DDP at every forward
    assert torch.equal(r0["queue"], r1["queue"])
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=1e-6, msg=k)


def test_split_bn_on_one_gpu_of_the_docs():
    """The split-BN lines: the core sees split batch norm (so it shuffles the keys across the groups) and trains."""
    ns = {"__name__": "pasted"}
    code = IMPORTS + "import torchvision\nfrom functools import partial\n" + section("moco.py", 2) \
        + section("moco.py", 4) + docs_block("SplitBatchNorm")
    exec(compile(code, "<docs/moco.md split BN>", "exec"), ns)
    model = ns["model"]
    assert model.split_bn and all(m.num_splits == 8 for m in model.encoder_q.modules()
                                  if isinstance(m, ns["SplitBatchNorm"]))
    loss, _, _, keys = model.training_loss(torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32))
    loss.backward()
    model.update_dictionary(keys)
    assert torch.isfinite(loss) and model.queue_ptr.item() == 16
