"""Blob storage: one interface, its backends, and what runs over them (GC, migration).

core.storage.blobstore.BlobStore   the one interface (put_file, open_read, has, size, delete, list)
├── FilesystemBlobStore            blobstore.py: the default, files under the data dir
├── DatabaseBlobStore              database_store.py: chunked rows in the core's own database
├── S3BlobStore                    s3_store.py: any S3-compatible object store, configured by env
└── StoreRegistry                  backends.py: writes to the active backend, reads fall back
gc.py                              blob GC: keep the desired set and the newest N, grace period
migration.py                       copy every blob to another backend, verified, resumable
"""
