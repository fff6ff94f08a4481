"""The SOAP time service (Spyne mounted in twisted.web)."""
