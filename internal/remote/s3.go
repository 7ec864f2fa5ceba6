package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Config names one remote. Credentials are never in it: NewS3 takes them
// from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, else the
// AWS shared credentials file (AWS_SHARED_CREDENTIALS_FILE or
// ~/.aws/credentials, AWS_PROFILE): minio-go's credential chain.
type S3Config struct {
	URL      string // s3://BUCKET[/PREFIX]
	Endpoint string // http(s)://host[:port]; empty = AWS
	Region   string // optional; else AWS_REGION, AWS_DEFAULT_REGION
}

// Deadlines of one S3 request (on top of the caller's ctx), and the
// client's bounded retry. Variables so tests can shorten them.
var (
	requestTimeout = 2 * time.Minute // one request, its body included
	dialTimeout    = 10 * time.Second
	maxRetries     = 3
)

const maxListKeys = 1 << 20 // keys one List returns at most

// ParseURL splits s3://BUCKET[/PREFIX], checking the bucket against S3's
// naming rules and the prefix for a clean relative path (no "..", no
// leading or doubled "/", no control characters).
func ParseURL(u string) (bucket, prefix string, err error) {
	rest, ok := strings.CutPrefix(u, "s3://")
	if !ok {
		return "", "", fmt.Errorf("%w: remote URL %q: must start with s3://", ErrInvalid, u)
	}
	bucket, prefix, _ = strings.Cut(rest, "/")
	if err := validBucket(bucket); err != nil {
		return "", "", fmt.Errorf("%w: remote URL %q: %v", ErrInvalid, u, err)
	}
	prefix = strings.TrimSuffix(prefix, "/")
	if prefix == "" {
		return bucket, "", nil
	}
	if len(prefix) > 512 {
		return "", "", fmt.Errorf("%w: remote URL %q: prefix longer than 512 bytes", ErrInvalid, u)
	}
	for _, seg := range strings.Split(prefix, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return "", "", fmt.Errorf("%w: remote URL %q: the prefix must be a clean path (no empty, '.' or '..' parts)", ErrInvalid, u)
		}
	}
	for _, r := range prefix {
		if r < 0x20 || r == 0x7f || r == '\\' || r == '?' || r == '#' {
			return "", "", fmt.Errorf("%w: remote URL %q: the prefix has a control character, '\\', '?' or '#'", ErrInvalid, u)
		}
	}
	return bucket, prefix, nil
}

// validBucket applies S3's bucket naming rules.
func validBucket(b string) error {
	if len(b) < 3 || len(b) > 63 {
		return fmt.Errorf("bucket %q: 3 to 63 characters", b)
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return fmt.Errorf("bucket %q: only lowercase letters, digits, '-' and '.'", b)
		}
	}
	if !isAlnum(b[0]) || !isAlnum(b[len(b)-1]) || strings.Contains(b, "..") || net.ParseIP(b) != nil {
		return fmt.Errorf("bucket %q: must start and end with a letter or digit, have no '..' and not be an IP address", b)
	}
	return nil
}

func isAlnum(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }

type s3Store struct {
	c        *minio.Client
	bucket   string
	prefix   string // "" or "PREFIX/"
	endpoint string
}

// NewS3 returns the Store for cfg. It makes no request; the first call
// says whether the endpoint answers (ErrUnreachable) and takes the
// credentials (ErrAuth).
func NewS3(ctx context.Context, cfg S3Config) (Store, error) {
	bucket, prefix, err := ParseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	host, secure := "s3.amazonaws.com", true
	if cfg.Endpoint != "" {
		e, err := url.Parse(cfg.Endpoint)
		if err != nil || (e.Scheme != "http" && e.Scheme != "https") || e.Host == "" || e.User != nil ||
			(e.Path != "" && e.Path != "/") || e.RawQuery != "" || e.Fragment != "" {
			return nil, fmt.Errorf("%w: endpoint %q: give http(s)://HOST[:PORT], without a path", ErrInvalid, cfg.Endpoint)
		}
		host, secure = e.Host, e.Scheme == "https"
	}
	region := cfg.Region
	if region == "" {
		region = os.Getenv("AWS_REGION")
	}
	if region == "" {
		region = os.Getenv("AWS_DEFAULT_REGION")
	}
	tr, err := minio.DefaultTransport(secure)
	if err != nil {
		return nil, err
	}
	tr.DialContext = (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext
	tr.TLSHandshakeTimeout = dialTimeout
	tr.ResponseHeaderTimeout = requestTimeout
	tr.Proxy = nil // the endpoint is named explicitly
	c, err := minio.New(host, &minio.Options{
		Creds:      credentials.NewChainCredentials([]credentials.Provider{&credentials.EnvAWS{}, &credentials.FileAWSCredentials{}}),
		Secure:     secure,
		Transport:  tr,
		Region:     region,
		MaxRetries: maxRetries,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if prefix != "" {
		prefix += "/"
	}
	return &s3Store{c: c, bucket: bucket, prefix: prefix, endpoint: host}, nil
}

// mapErr turns an S3 or network error into one of the package's sentinels
// when it is one of them, naming what failed.
func (s *s3Store) mapErr(parent, rctx context.Context, what string, err error) error {
	if err == nil {
		return nil
	}
	if perr := parent.Err(); perr != nil {
		return perr
	}
	if rctx.Err() != nil {
		return fmt.Errorf("%w: %s: %s gave no answer within %s", ErrUnreachable, what, s.endpoint, requestTimeout)
	}
	switch minio.ToErrorResponse(err).Code {
	case "NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchUpload":
		return fmt.Errorf("%w: %s: %v", ErrNotFound, what, err)
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccountProblem",
		"XAdminUserNotFound": // versitygw's answer (404) to an unknown access key

		return fmt.Errorf("%w: %s on %s: %v", ErrAuth, what, s.endpoint, err)
	}
	var op *net.OpError
	var dns *net.DNSError
	if errors.As(err, &dns) || errors.As(err, &op) && op.Op == "dial" {
		return fmt.Errorf("%w: %s: %v", ErrUnreachable, what, err)
	}
	if strings.Contains(err.Error(), "credentials") && strings.Contains(err.Error(), "empty") {
		return fmt.Errorf("%w: %s: %v", ErrAuth, what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (s *s3Store) Put(ctx context.Context, key string, r io.Reader, size int64) error {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	_, err := s.c.PutObject(rctx, s.bucket, s.prefix+key, r, size, minio.PutObjectOptions{ContentType: "application/octet-stream"})
	return s.mapErr(ctx, rctx, "put "+key, err)
}

// body closes the request's context with the object.
type body struct {
	*minio.Object
	cancel context.CancelFunc
}

func (b body) Close() error { err := b.Object.Close(); b.cancel(); return err }

func (s *s3Store) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	obj, err := s.c.GetObject(rctx, s.bucket, s.prefix+key, minio.GetObjectOptions{})
	if err == nil {
		_, err = obj.Stat() // the GET itself: its error, ErrNotFound among them
	}
	if err != nil {
		if obj != nil {
			obj.Close()
		}
		err = s.mapErr(ctx, rctx, "get "+key, err)
		cancel()
		return nil, err
	}
	return body{obj, cancel}, nil
}

func (s *s3Store) Exists(ctx context.Context, key string) (bool, error) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	_, err := s.c.StatObject(rctx, s.bucket, s.prefix+key, minio.StatObjectOptions{})
	err = s.mapErr(ctx, rctx, "stat "+key, err)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

func (s *s3Store) List(ctx context.Context, prefix string) ([]string, error) {
	m, err := s.ListSizes(ctx, prefix)
	if err != nil {
		return nil, err
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	return keys, nil
}

// ListSizes lists the keys under prefix with their sizes (at most maxListKeys).
func (s *s3Store) ListSizes(ctx context.Context, prefix string) (map[string]int64, error) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	out := map[string]int64{}
	for o := range s.c.ListObjectsIter(rctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix + prefix, Recursive: true}) {
		if o.Err != nil {
			return nil, s.mapErr(ctx, rctx, "list "+prefix, o.Err)
		}
		k, ok := strings.CutPrefix(o.Key, s.prefix)
		if !ok {
			continue
		}
		if len(out) >= maxListKeys {
			return nil, fmt.Errorf("list %s: more than %d keys", prefix, maxListKeys)
		}
		out[k] = o.Size
	}
	return out, nil
}

func (s *s3Store) Delete(ctx context.Context, key string) error {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	return s.mapErr(ctx, rctx, "delete "+key, s.c.RemoveObject(rctx, s.bucket, s.prefix+key, minio.RemoveObjectOptions{}))
}
