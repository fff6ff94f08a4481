"""twistd plugin ``p2p-time``: the SOAP time service."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _TimeServiceMaker:
    tapname = "p2p-time"
    description = "SOAP 1.1 get_time service (Spyne in twisted.web), WSDL at /?wsdl."

    @property
    def options(self):
        from p2p.timews.service import Options

        return Options

    def makeService(self, options):
        from p2p.timews.service import make_service

        return make_service(options)


p2p_time = _TimeServiceMaker()
