"""Offline conversion (`ips prep`): slides and volumes into ips stores (docs/FORMAT.md).

Modules: `readers` (one interface, a backend per format), `writer` (partial store, shards, marker),
`pyramid` (2x mean levels, built while level 0 is written), `tissue` (masks), `grid` (patch grids),
`thumbnail` (the PNG beside each store), `options` (PrepOptions), `convert` (the pipeline and the Python
API: `convert_file`, `convert_array`, `add_grid`), `cli` (`ips prep`), `testing` (the reader contract
tests and generated fixtures).
"""
