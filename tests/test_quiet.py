"""What reaches the console: TensorFlow's start-up chatter filtered, converters' output caught,
real warnings kept (``hwexp.quiet``)."""

import logging
import os
import subprocess
import sys

import pytest

from hwexp import quiet

ABSL_NOTICE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)
ONEDNN = (
    "I0000 00:00:1796320505.860768   17557 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results"
)
CUINIT = (
    "E0000 00:00:1796320511.104992   17557 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"
)
REAL_ERROR = "E0000 00:00:1796320511.104992   17557 op_kernel.cc:1840] OP_REQUIRES failed: OOM"


@pytest.mark.parametrize("driver", [False, True])
def test_start_up_chatter_is_noise_and_real_lines_are_not(monkeypatch, driver):
    monkeypatch.setattr(quiet, "has_nvidia_driver", lambda: driver)
    assert quiet.is_noise(ABSL_NOTICE) and quiet.is_noise(ONEDNN)
    assert quiet.is_noise(CUINIT) is not driver  # a real fault where a GPU is expected
    for line in (REAL_ERROR, "UserWarning: something the user must know", "error: x"):
        assert not quiet.is_noise(line), line


def test_captured_output_catches_c_level_and_python_output_but_not_hwexp_warnings(capfd):
    with quiet.captured_output(keep_logger="hwexp") as captured:
        os.write(1, b"converter bar on fd 1\n")
        os.write(2, b"converter note on fd 2\n")
        print("python chatter")
        print("python note", file=sys.stderr)
        logging.getLogger("hwexp.export.verify").warning("accuracy differs")
    out, err = capfd.readouterr()
    assert out == "" and err == "warning: accuracy differs\n"
    assert captured.lines() == [
        "converter bar on fd 1",
        "converter note on fd 2",
        "python chatter",
        "python note",
    ]
    assert logging.getLogger("hwexp").propagate  # restored


# Import TensorFlow (through Keras, as hwexp does) after hwexp, and start its devices.
IMPORT_TENSORFLOW = "import hwexp, keras, tensorflow as tf; tf.constant(1.0) + 1; print('ok')"


def test_importing_tensorflow_after_hwexp_prints_nothing_and_the_filter_can_be_turned_off():
    def stderr(env: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", IMPORT_TENSORFLOW],
            capture_output=True,
            text=True,
            env=os.environ | env,
            timeout=300,
        )
        assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
        return done.stderr

    assert stderr({"TF_CPP_MIN_LOG_LEVEL": "2"}) == ""
    everything = stderr({"TF_CPP_MIN_LOG_LEVEL": "0"})  # TensorFlow's own "show everything"
    assert ABSL_NOTICE in everything and "oneDNN custom operations" in everything
