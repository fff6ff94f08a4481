"""twistd plugin ``p2p-indexer`` (the service itself lives in ``p2p.indexer.service``)."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class IndexerServiceMaker:
    """Builds the indexer service; imports it only when twistd runs this plugin."""

    tapname = "p2p-indexer"
    description = "p2p indexer: users, addresses and published files, stored in SQLite."

    @property
    def options(self):
        from p2p.indexer.service import Options

        return Options

    def makeService(self, options):
        from p2p.indexer.service import make_service

        return make_service(options)


indexer = IndexerServiceMaker()
