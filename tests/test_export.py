"""`fitdist export`: each file loads and runs in a process that cannot import fitdist, and gives
the student's outputs on fresh random inputs (fp32; tolerance 1e-4 absolute and relative: the
same arithmetic, reordered by another runtime's kernels)."""

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import STUDENT, run_cli, write_config

from fitdist.config import ModelConfig, load_config, to_dict
from fitdist.errors import UserError
from fitdist.export import export
from fitdist.models import build_model

TOL = {"atol": 1e-4, "rtol": 1e-4}

# What a user of the file runs: torch (and onnxruntime) only; `import fitdist` fails here.
LOADER = """
import sys
sys.modules["fitdist"] = None  # any import of fitdist, direct or from inside a loader, fails
import torch
fmt, path, inputs, outputs = sys.argv[1:]
xs = torch.load(inputs)
if fmt == "torchscript":
    model = torch.jit.load(path)
    ys = [model(x) for x in xs]
elif fmt == "exported":
    model = torch.export.load(path).module()
    ys = [model(x) for x in xs]
else:
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ys = [torch.from_numpy(session.run(None, {name: x.numpy()})[0]) for x in xs]
torch.save([y.detach() for y in ys], outputs)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run as fitdist leaves it: config.yaml and student.pt (BatchNorm statistics
    moved away from their initial values so that eval mode matters)."""
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(write_config(root / "c.yaml"))
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**STUDENT), 10, 1)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.5)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), run_dir / "student.pt")
    return run_dir


def _student(run_dir):
    model = build_model(ModelConfig(**STUDENT), 10, 1)
    model.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True))
    return model.eval()


def _outside_fitdist(fmt, path, tmp_path):
    xs = [torch.randn(5, 1, 28, 28), torch.randn(1, 1, 28, 28)]  # batch sizes unlike export's example
    torch.save(xs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, fmt, str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return xs, torch.load(tmp_path / "outputs.pt")


@pytest.mark.parametrize("fmt", ["torchscript", "exported", "onnx"])
def test_exported_file_runs_without_fitdist(run, tmp_path, fmt):
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(module)
    path = export(run, fmt, tmp_path / "out" / f"student-{fmt}")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"student-{fmt}"]  # one file, nothing beside it
    xs, ys = _outside_fitdist(fmt, path, tmp_path)
    student = _student(run)
    with torch.no_grad():
        for x, y in zip(xs, ys):
            assert y.shape == (x.shape[0], 10)
            torch.testing.assert_close(y, student(x), **TOL)


def test_default_path_and_cli(run, tmp_path):
    done = run_cli("export", run, "--format", "exported")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run / "student.pt2") and (run / "student.pt2").is_file()
    bad = run_cli("export", tmp_path / "nowhere", "--format", "exported")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "export: no such file" in bad.stderr
    bad = run_cli("export", run, "--format", "tflite")
    assert bad.returncode == 2 and "tflite" in bad.stderr and bad.stderr.count("\n") == 1


UNEXPORTABLE = '''
import torch
from torch import nn

class DataDependent(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)

    def forward(self, x):
        if x.sum() > 0:  # control flow on values: no single graph captures it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))

def factory(num_classes=10, in_channels=1):
    return DataDependent(num_classes)
'''


def test_a_model_that_cannot_be_exported_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "unexportable_model.py").write_text(UNEXPORTABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(write_config(tmp_path / "c.yaml", student={"name": "unexportable_model:factory"}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    torch.save(build_model(cfg.student, 10, 1).state_dict(), run_dir / "student.pt")
    with pytest.raises(UserError) as e:
        export(run_dir, "exported", tmp_path / "x.pt2")
    message = str(e.value)
    assert message.startswith("export: the student cannot be exported as exported: ") and "\n" not in message
