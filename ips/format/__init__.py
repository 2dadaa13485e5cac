"""The store format. `store` owns the contract (a store's names on disk, the completion marker, the
commit, opening a store checked, verifying it); it builds on the names of arrays, groups and attributes
(`names`), the one sharding layout that both the reader (`ips.data.chunk_io`) and the writer
(`data_prep.writer`) follow (`sharding`), the checksum records (`checksums`) and where a store lives,
with the guard that keeps local reads inside it (`location`)."""
