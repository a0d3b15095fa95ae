"""TensorFlow's start-up chatter is dropped from task logs; nothing real is (tasks.tf_logging)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

from tests.helpers.runs import ROOT

CPU_HOST_STARTUP = [  # what `import tensorflow` and its first device lookup printed on a CPU worker (TF 2.21)
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796173090.637546   24437 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
    "will not be used.",
    "I0000 00:00:1796173090.877033   24437 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    "compiler flags.",
    "E0000 00:00:1796173106.935906   24437 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
]
XNNPACK = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
GENUINE = "E0000 00:00:1796173106.9 op_kernel.cc:1857] OP_REQUIRES failed at save_restore_v2_ops.cc: NOT_FOUND"


def test_startup_chatter_is_dropped_and_genuine_lines_pass(capsys, caplog):
    from tasks.tf_logging import replay

    with caplog.at_level(logging.INFO, logger="tasks.tf_logging"):
        replay("\n".join([*CPU_HOST_STARTUP, XNNPACK, GENUINE]) + "\n", gpu_host=False)
    assert capsys.readouterr().err == GENUINE + "\n"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "Created TensorFlow Lite XNNPACK delegate for CPU.")]


def test_cuda_lines_are_kept_on_a_gpu_worker(capsys):
    from tasks.tf_logging import replay

    replay("\n".join(CPU_HOST_STARTUP), gpu_host=True)
    shown = capsys.readouterr().err
    assert "cuInit" in shown and "Could not find cuda drivers" in shown
    assert "absl::InitializeLog" not in shown and "cpu_feature_guard" not in shown


def test_a_quiet_import_still_lets_a_genuine_task_error_reach_stderr(tmp_path):
    """In a fresh process: a stand-in `tensorflow` writes start-up chatter and one real error straight to file
    descriptor 2 (as C++ does) while it imports; afterwards the task logs an error and fails."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(textwrap.dedent(f"""
        import os
        for line in {CPU_HOST_STARTUP + [GENUINE]!r}:
            os.write(2, (line + "\\n").encode())
        class config:
            @staticmethod
            def list_physical_devices():
                os.write(2, {(CPU_HOST_STARTUP[0] + chr(10)).encode()!r})
                return []
    """))
    script = textwrap.dedent("""
        import logging, sys
        from tasks import tf_logging
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
        tf_logging.install()
        import tensorflow
        logging.getLogger("task").error("the step failed: no images under s3://b/p/train/pizza")
        raise RuntimeError("genuine task error")
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert GENUINE in result.stderr
    assert "ERROR the step failed: no images under s3://b/p/train/pizza" in result.stderr
    assert "RuntimeError: genuine task error" in result.stderr
    if not os.path.exists("/proc/driver/nvidia/version"):
        assert "cuda" not in result.stderr.lower() and "absl" not in result.stderr
