"""
The packaging lists every part of the code: setup.cfg names its packages by hand,
and a subpackage missing there would be missing from the wheel and the .deb.
"""

from __future__ import annotations

import configparser
import os

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from banyan_kproxy.testing.stack import repository_file


class SetupCfgTests(SynchronousTestCase):
    """
    ``[options] packages`` in setup.cfg against the source tree.
    """

    def test_every_subpackage_listed(self) -> None:
        """
        Every directory of banyan_kproxy/ with an ``__init__.py`` is listed.
        """
        setup_cfg = repository_file("setup.cfg")
        if setup_cfg is None:
            raise SkipTest("not running from a source checkout")
        root = os.path.dirname(setup_cfg)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(setup_cfg, encoding="utf-8")
        listed = set(parser.get("options", "packages").split())
        found = set()
        for directory, dirs, files in os.walk(os.path.join(root, "banyan_kproxy")):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                found.add(os.path.relpath(directory, root).replace(os.sep, "."))
        self.assertIn("banyan_kproxy.proxy", found)
        self.assertEqual(sorted(found - listed), [])
