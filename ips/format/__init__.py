"""The store format: names of arrays, groups and attributes (`names`), and the one sharding layout that
both the reader (`ips.data.chunk_io`) and the writer (`data_prep.writer`) follow (`sharding`)."""
