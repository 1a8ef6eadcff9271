"""The torch extra is optional: ``import shardfeed`` never imports torch, and ``import
shardfeed.torch`` without torch raises an ImportError naming the extra. Runs without torch
installed (the absence is simulated in a subprocess), so it also runs where test_torch.py skips."""

import subprocess
import sys


def test_import_shardfeed_does_not_import_torch_and_the_error_names_the_extra():
    code = ("import sys; import shardfeed; assert 'torch' not in sys.modules, 'import shardfeed imported torch'\n"
            "sys.modules['torch'] = None\n"
            "try:\n    import shardfeed.torch\nexcept ImportError as e:\n    print(e)\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "shardfeed[torch]"' in out.stdout
