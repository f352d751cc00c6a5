use super::*;

/// `sha256:` and 64 copies of `c`.
fn d(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn index(json: &str) -> ImageIndex {
    serde_json::from_str(json).unwrap()
}

fn test_index() -> ImageIndex {
    index(&format!(
        r#"{{"schemaVersion":2,"manifests":[
        {{"mediaType":"m","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
        {{"mediaType":"m","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm","variant":"v6"}}}},
        {{"mediaType":"m","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
        {{"mediaType":"m","digest":"{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}
    ]}}"#,
        d('1'),
        d('2'),
        d('3'),
        d('4')
    ))
}

fn pick_in(index: &ImageIndex, p: &str) -> Option<String> {
    select(index, &parse_platform(p).unwrap()).map(|d| d.digest().to_string())
}

fn pick(p: &str) -> Option<String> {
    pick_in(&test_index(), p)
}

fn reference() -> Reference {
    "registry.example/app:1".parse().unwrap()
}

#[test]
fn platform_selection() {
    assert_eq!(pick("linux/amd64"), Some(d('1')));
    assert_eq!(pick("linux/arm64"), Some(d('3')));
    // arm64 without a variant in the index is v8.
    assert_eq!(pick("linux/arm64/v8"), Some(d('3')));
    assert_eq!(pick("linux/arm/v6"), Some(d('2')));
    assert_eq!(pick("linux/arm/v7"), None);
    assert_eq!(pick("windows/amd64"), None);
}

#[test]
fn platform_parsing() {
    for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
        assert!(parse_platform(bad).is_err(), "{bad:?}");
    }
    for text in [
        "linux/arm64/v8",
        "linux/amd64",
        "linux/riscv64",
        "plan10/z80/v2",
    ] {
        assert_eq!(platform_string(&parse_platform(text).unwrap()), text);
    }
}

#[test]
fn kind_from_media_type_or_shape() {
    let r: Reference = "x".parse().unwrap();
    let oci_index = MediaType::ImageIndex.to_string();
    let oci_manifest = MediaType::ImageManifest.to_string();
    assert_eq!(kind_of(&oci_index, b"", &r).unwrap(), Kind::Index);
    assert_eq!(kind_of(&oci_manifest, b"", &r).unwrap(), Kind::Image);
    assert_eq!(kind_of(DOCKER_MANIFEST_LIST, b"", &r).unwrap(), Kind::Index);
    assert_eq!(kind_of(DOCKER_MANIFEST, b"", &r).unwrap(), Kind::Image);
    assert_eq!(
        kind_of("", br#"{"manifests":[]}"#, &r).unwrap(),
        Kind::Index
    );
    assert_eq!(
        kind_of("application/json", br#"{"config":{}}"#, &r).unwrap(),
        Kind::Image
    );
    assert!(kind_of("", b"{}", &r).is_err());
    assert!(kind_of("", b"nope", &r).is_err());
    let err = kind_of(
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        b"",
        &r,
    )
    .unwrap_err();
    assert!(err.to_string().contains("schema 1"), "{err}");
}

/// The example manifest list of Docker's "Image Manifest V 2, Schema 2" specification.
const DOCKER_LIST_JSON: &str = r#"{
  "schemaVersion": 2,
  "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
  "manifests": [
    {
      "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
      "size": 7143,
      "digest": "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f",
      "platform": {
        "architecture": "ppc64le",
        "os": "linux"
      }
    },
    {
      "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
      "size": 7682,
      "digest": "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270",
      "platform": {
        "architecture": "amd64",
        "os": "linux",
        "features": [
          "sse4"
        ]
      }
    }
  ]
}"#;

/// The example image manifest of the same specification.
const DOCKER_MANIFEST_JSON: &str = r#"{
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "size": 7023,
        "digest": "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7"
    },
    "layers": [
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 32654,
            "digest": "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f"
        },
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 16724,
            "digest": "sha256:3c3a4604a545cdc127456d94e421cd355bca5b528f4a9c1905b15da2eb4a4c6b"
        },
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 73109,
            "digest": "sha256:ec4b8955958665577945c89419d1af06b5f7636b4ac3da7f12184802ad867736"
        }
    ]
}"#;

/// A Windows image as Docker Hub and MCR serve them: a manifest list whose entries carry
/// `os.version`, and a manifest whose base layer is foreign (fetched from its `urls`).
const WINDOWS_LIST_JSON: &str = r#"{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
   "manifests": [
      {
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "size": 1161,
         "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
         "platform": {
            "architecture": "amd64",
            "os": "windows",
            "os.version": "10.0.17763.5830"
         }
      },
      {
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "size": 1161,
         "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
         "platform": {
            "architecture": "arm",
            "os": "linux",
            "variant": "v7"
         }
      }
   ]
}"#;

const WINDOWS_MANIFEST_JSON: &str = r#"{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": 1192,
      "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
   },
   "layers": [
      {
         "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
         "size": 102174197,
         "digest": "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
         "urls": [
            "https://mcr.microsoft.com/v2/windows/nanoserver/blobs/sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
         ]
      },
      {
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 1024,
         "digest": "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
      }
   ]
}"#;

fn blob(digest: &str, size: u64) -> (Digest, u64) {
    (digest.parse().unwrap(), size)
}

#[test]
fn docker_manifest_lists_parse_as_indexes() {
    let r = reference();
    assert_eq!(
        kind_of(DOCKER_MANIFEST_LIST, DOCKER_LIST_JSON.as_bytes(), &r).unwrap(),
        Kind::Index
    );
    let list: ImageIndex = parse_json(DOCKER_LIST_JSON.as_bytes(), "index", &r).unwrap();
    assert_eq!(
        list.media_type().as_ref(),
        Some(&MediaType::Other(DOCKER_MANIFEST_LIST.into()))
    );
    assert!(
        (list.manifests().iter())
            .all(|m| *m.media_type() == MediaType::Other(DOCKER_MANIFEST.into()))
    );
    let amd = "sha256:5b0bcabd1ed22e9fb1310cf6c2dec7cdef19f0ad69efa1f392e94a4333501270";
    assert_eq!(pick_in(&list, "linux/amd64").as_deref(), Some(amd));
    let ppc = "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f";
    assert_eq!(pick_in(&list, "linux/ppc64le").as_deref(), Some(ppc));
    assert_eq!(pick_in(&list, "linux/arm64"), None);
    let chosen = select(&list, &parse_platform("linux/amd64").unwrap()).unwrap();
    assert_eq!(parse_digest(chosen, &r).unwrap().to_string(), amd);

    let windows: ImageIndex = parse_json(WINDOWS_LIST_JSON.as_bytes(), "index", &r).unwrap();
    assert_eq!(pick_in(&windows, "windows/amd64"), Some(d('1')));
    assert_eq!(pick_in(&windows, "linux/arm"), Some(d('2')));
    // arm without a variant defaults to v7, but this entry says v7 anyway.
    assert_eq!(pick_in(&windows, "linux/arm/v7"), Some(d('2')));
    assert_eq!(pick_in(&windows, "linux/amd64"), None);
    let listed: Vec<String> = (windows.manifests().iter())
        .filter_map(|d| d.platform().as_ref().map(platform_string))
        .collect();
    assert_eq!(listed, ["windows/amd64", "linux/arm/v7"]);
}

#[test]
fn docker_manifests_give_config_then_layers() {
    let r = reference();
    assert_eq!(
        kind_of(DOCKER_MANIFEST, DOCKER_MANIFEST_JSON.as_bytes(), &r).unwrap(),
        Kind::Image
    );
    // Without a usable Content-Type the shape decides.
    assert_eq!(
        kind_of("", DOCKER_MANIFEST_JSON.as_bytes(), &r).unwrap(),
        Kind::Image
    );
    let image = parse_image(DOCKER_MANIFEST_JSON.as_bytes(), &r).unwrap();
    assert_eq!(
        image.media_type().as_ref(),
        Some(&MediaType::Other(DOCKER_MANIFEST.into()))
    );
    assert_eq!(
        *image.config().media_type(),
        MediaType::Other("application/vnd.docker.container.image.v1+json".into())
    );
    assert_eq!(
        blobs_of(&[image], &r).unwrap(),
        [
            blob(
                "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7",
                7023
            ),
            blob(
                "sha256:e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f",
                32654
            ),
            blob(
                "sha256:3c3a4604a545cdc127456d94e421cd355bca5b528f4a9c1905b15da2eb4a4c6b",
                16724
            ),
            blob(
                "sha256:ec4b8955958665577945c89419d1af06b5f7636b4ac3da7f12184802ad867736",
                73109
            ),
        ]
    );
}

#[test]
fn foreign_and_non_distributable_layers_are_skipped() {
    let r = reference();
    let windows = parse_image(WINDOWS_MANIFEST_JSON.as_bytes(), &r).unwrap();
    assert_eq!(
        blobs_of(&[windows], &r).unwrap(),
        [blob(&d('a'), 1192), blob(&d('c'), 1024)]
    );

    let layer = |media_type: &str, c: char| {
        format!(
            r#"{{"mediaType":"{media_type}","size":5,"digest":"{}"}}"#,
            d(c)
        )
    };
    let oci = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{},{},{},{},{}]}}"#,
        MediaType::ImageManifest,
        layer("application/vnd.oci.image.config.v1+json", '0'),
        layer(
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            '1'
        ),
        layer(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            '2'
        ),
        layer(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
            '3'
        ),
        layer("application/vnd.oci.image.layer.v1.tar+zstd", '4'),
        layer("application/vnd.oci.image.layer.v1.tar+gzip", '5'),
    );
    let image = parse_image(oci.as_bytes(), &r).unwrap();
    assert_eq!(
        blobs_of(&[image], &r).unwrap(),
        [blob(&d('0'), 5), blob(&d('4'), 5), blob(&d('5'), 5)]
    );
}

#[test]
fn configs_first_then_layers_each_once() {
    let r = reference();
    let manifest = |config: char, layers: &[char]| {
        let layers: Vec<String> = (layers.iter())
            .map(|c| {
                format!(
                    r#"{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":2,"digest":"{}"}}"#,
                    d(*c)
                )
            })
            .collect();
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":1,"digest":"{}"}},"layers":[{}]}}"#,
            d(config),
            layers.join(",")
        );
        parse_image(json.as_bytes(), &r).unwrap()
    };
    let images = [manifest('a', &['1', '2']), manifest('a', &['3', '1'])];
    assert_eq!(
        blobs_of(&images, &r).unwrap(),
        [
            blob(&d('a'), 1),
            blob(&d('1'), 2),
            blob(&d('2'), 2),
            blob(&d('3'), 2)
        ]
    );
}

#[test]
fn malformed_descriptors_are_invalid() {
    let r = reference();
    // Not a digest at all: refused while parsing.
    let bad = DOCKER_MANIFEST_JSON.replacen("sha256:b5b2", "sha256:XYZ", 1);
    let err = parse_image(bad.as_bytes(), &r).unwrap_err();
    assert!(matches!(err, OriginError::Invalid(_)), "{err}");
    assert!(
        err.to_string().contains("malformed image manifest"),
        "{err}"
    );
    // A well-formed digest Shoal does not use (SHA-512): refused when its blobs are listed.
    let sha512 = format!("sha512:{}", "e".repeat(128));
    let other = DOCKER_MANIFEST_JSON.replacen(
        "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7",
        &sha512,
        1,
    );
    let image = parse_image(other.as_bytes(), &r).unwrap();
    let err = blobs_of(&[image], &r).unwrap_err();
    assert!(matches!(err, OriginError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("descriptor digest"), "{err}");
    // A manifest list is not an image manifest.
    assert!(parse_image(DOCKER_LIST_JSON.as_bytes(), &r).is_err());
}
