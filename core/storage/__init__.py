"""Blob store backends beyond the filesystem (database, S3) and the registry that ties them.

core.blobstore.BlobStore       the one interface (put_file, open_read, has, size, delete, list)
├── FilesystemBlobStore        core/blobstore.py
├── DatabaseBlobStore          database.py: chunked rows in the core's own database
├── S3BlobStore                s3.py: any S3-compatible object store, configured by env
└── StoreRegistry              registry.py: writes to the active backend, reads fall back

runtime.py assembles them with the installer lock, GC, migration and rollback for the server.
"""
