"""The algorithm core of each script runs when copied alone into someone else's file: section 2 executed in a fresh
namespace with only the standard imports trains a step (the README says which sections to copy for what), and, read
without running it, every name it uses is defined in the pasted sections, imported by the standard imports or a
builtin, also on the branches a one-process test never takes (world > 1)."""
import builtins
import os
import re
import symtable

import pytest
import torch
import torchvision

import dim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORTS = "import math\nimport torch\nimport torch.distributed as dist\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
HEADER = re.compile(r"^# -{100}\n# (\d+)\. [^\n]*\n# -{100}\n", re.M)


def section(script, number):
    """The text of section `number` of a script, between its header and the next one."""
    text = open(os.path.join(ROOT, script)).read()
    heads = list(HEADER.finditer(text))
    i = [int(h.group(1)) for h in heads].index(number)
    return text[heads[i].end():heads[i + 1].start()]


def pasted(script, *numbers, imports=IMPORTS):
    """A fresh namespace holding the standard imports and the given sections, as a reader's file would."""
    ns = {"__name__": "pasted"}
    exec(compile(imports + "\n".join(section(script, n) for n in numbers), f"<{script} pasted>", "exec"), ns)
    return ns


def free_names(code):
    """The names `code` uses that neither it (at its top level: assignments, def, class, import) nor an enclosing
    function defines: read from the symbol tables of its functions, classes, lambdas and comprehensions."""
    top = symtable.symtable(code, "<pasted>", "exec")

    def used(table, enclosing):
        names = {s.get_name() for s in table.get_symbols() if s.is_referenced() and (
            table is top or s.is_global() or s.is_free() and s.get_name() not in enclosing)}
        if table.get_type() == "function":
            enclosing = enclosing | {s.get_name() for s in table.get_symbols() if s.is_local()}
        return names.union(*(used(child, enclosing) for child in table.get_children()))
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    return used(top, frozenset()) - defined - set(dir(builtins)) - {"__class__"}  # __class__: super()'s cell


@pytest.mark.parametrize("script, numbers, imports", [
    ("moco.py", (2,), IMPORTS), ("moco.py", (2, 3, 4), IMPORTS + "import torchvision\nfrom functools import partial\n"),
    ("dim.py", (2,), IMPORTS)])
def test_core_uses_only_its_own_names_and_the_imports(script, numbers, imports):
    """Read, not run: every name the pasted sections use is theirs, an import's or a builtin."""
    code = "\n".join(section(script, n) for n in numbers)
    allowed = {s.get_name() for s in symtable.symtable(imports, "<imports>", "exec").get_symbols()}
    assert free_names(code) - allowed == set(), f"{script} sections {numbers} use names defined elsewhere"
    assert free_names("def f(x):\n    if x > 1:\n        return usable_cpus()\n") == {"usable_cpus"}  # the reader


def test_section_headers_are_found():
    assert "class MoCo(nn.Module)" in section("moco.py", 2) and "class DIM(nn.Module)" in section("dim.py", 2)
    with pytest.raises(ValueError):
        section("moco.py", 9)


def test_moco_core_alone_trains_a_torchvision_resnet():
    """moco.py section 2 + torchvision's resnet18: the official forward() and the training step (training_loss, a
    backward pass, SGD, update_dictionary) with nothing else of moco.py."""
    ns = pasted("moco.py", 2)
    torch.manual_seed(0)
    model = ns["MoCo"](torchvision.models.resnet18, dim=32, K=48, m=0.99, T=0.2, mlp=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    before = model.encoder_q.conv1.weight.detach().clone()
    loss, acc1, acc5, keys = model.training_loss(x1, x2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.update_dictionary(keys)
    assert torch.isfinite(loss) and model.queue_ptr.item() == 8
    assert not torch.equal(model.encoder_q.conv1.weight, before)
    logits, labels = model(x1, x2)
    assert logits.shape == (8, 49) and model.queue_ptr.item() == 16


def test_moco_rivals_and_encoders_alone():
    """Sections 2 and 3 (the two rival mechanisms) and 4 (split batch norm, the CIFAR stem, basic32), with
    torchvision and functools.partial besides the standard imports."""
    ns = pasted("moco.py", 2, 3, 4, imports=IMPORTS + "import torchvision\nfrom functools import partial\n")
    base = ns["partial"](ns["build_encoder"], "basic32", "cifar", 2)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    for model, inputs in ((ns["EndToEnd"](base, dim=16, T=0.2), (x1, x2)),
                          (ns["MemoryBank"](base, 100, dim=16, K=20, T=0.2), (x1, torch.arange(8))),
                          (ns["MoCo"](base, dim=16, K=32, T=0.2, symmetric=True), (x1, x2))):
        loss, _, _, pending = model.training_loss(*inputs)
        loss.backward()
        model.update_dictionary(pending)
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="cannot be split"):
        ns["build_encoder"]("resnet18", "cifar", 3)(torch.randn(8, 3, 32, 32))


def test_dim_core_alone_trains_the_scripts_encoder():
    """dim.py section 2 (estimators, critics, DIM, prior) with the script's basic32 encoder: one step of Eq. (8)
    with the prior's discriminator step (gradient penalty on), local and global objectives, every estimator."""
    ns = pasted("dim.py", 2)
    torch.manual_seed(0)
    model = ns["DIM"](dim.build_encoder("basic32", 32), 32, y_dim=64, local=True, glob=True, units=64,
                      global_critic="dot", global_layer="local")
    prior = ns["prior_discriminator"](64)
    opt, opt_d = torch.optim.Adam(model.parameters(), lr=1e-4), torch.optim.Adam(prior.parameters(), lr=1e-4)
    x = torch.randn(8, 3, 32, 32)
    for estimator in ("jsd", "nce", "dv"):
        losses, y = model(x, estimator, local_samples=16)
        d_loss, d_acc = ns["prior_d_loss"](prior, y, gp=1.0)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        loss = losses["local"] + 0.5 * losses["global"] + 0.1 * ns["prior_encoder_loss"](prior, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and torch.isfinite(d_loss)
