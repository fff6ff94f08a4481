"""twistd plugin ``p2p-stack``: indexer, audit logger and time service in one process."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _StackServiceMaker:
    tapname = "p2p-stack"
    description = "The indexer, the audit logger and the SOAP time service in one process."

    @property
    def options(self):
        from p2p.stack import Options

        return Options

    def makeService(self, options):
        from p2p.stack import make_service

        return make_service(options)


p2p_stack = _StackServiceMaker()
