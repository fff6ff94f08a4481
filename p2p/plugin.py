"""One twistd service maker for every p2p plugin in ``twisted/plugins/``.

twistd imports every plugin module to list them, so the maker names the module
that holds ``Options`` and ``make_service`` and imports it only when that
plugin is the one being run (``twistd --help`` stays fast and light).
"""

from __future__ import annotations

import importlib

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class LazyServiceMaker:
    """A twistd plugin whose service module follows the ``Options``/``make_service`` contract."""

    def __init__(self, tapname: str, description: str, module: str) -> None:
        self.tapname = tapname
        self.description = description
        self.module = module

    def _module(self):
        return importlib.import_module(self.module)

    @property
    def options(self) -> type[usage.Options]:
        return self._module().Options

    def makeService(self, options: usage.Options) -> IService:
        return self._module().make_service(options)
