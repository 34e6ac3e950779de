"""The adapter lifecycle: upload checks, content-addressed storage, versions, validation,
quotas, deletion and the cleanup of blobs nothing references any more."""
