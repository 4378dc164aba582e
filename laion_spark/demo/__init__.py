"""The bundled demo: a small synthetic crawl, a loopback image server, and the whole pipeline over them."""
