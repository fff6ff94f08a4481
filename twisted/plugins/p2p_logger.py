"""twistd plugin ``p2p-logger``: the ONC-RPC audit logger (see p2p.logger.service)."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class LoggerServiceMaker:
    tapname = "p2p-logger"
    description = "ONC-RPC audit logger: LOG over TCP and UDP, audit file, rpcbind registration."

    @property
    def options(self):
        from p2p.logger.service import Options

        return Options

    def makeService(self, options):
        from p2p.logger.service import make_service

        return make_service(options)


p2p_logger = LoggerServiceMaker()
