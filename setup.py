"""Ships ``mlx_lm_pref.pth``: the start-up hook that lets plain ``mlx_lm.lora`` train
preferences (see ``mlx_lm_pref_startup.py``). Everything else is in pyproject.toml.

A ``.pth`` file must sit at the top of site-packages, which no pyproject.toml key can express;
this ``build_py`` writes it there, for wheels and for editable installs alike.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "mlx_lm_pref.pth"
# site.py runs .pth lines that start with "import"; this one imports a module that itself
# imports only os and sys.
PTH_LINE = "import mlx_lm_pref_startup\n"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        # Editable installs build nothing into build_lib: there, setuptools' editable_wheel
        # writes the wheel's root from the install command's install_lib.
        if self.editable_mode:
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        path = Path(root, PTH)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]


setup(cmdclass={"build_py": build_py_with_pth})
